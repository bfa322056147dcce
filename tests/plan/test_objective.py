"""``gkpd.plan``'s objective as an object, and the deprecated ``latency_*`` keywords."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gkpd
from gkpd import LatencyObjective
from gkpd.plan.objective import resolve_objective


def test_latency_objective_checks_its_fields():
    assert LatencyObjective().name == "latency"
    with pytest.raises(ValueError, match="latency_batch must be a positive int"):
        LatencyObjective(batch=0)
    with pytest.raises(ValueError, match="latency_slack must be a number >= 0"):
        LatencyObjective(slack=-1)
    with pytest.raises(ValueError, match="latency_channels_last must be True or False"):
        LatencyObjective(channels_last="yes")
    for bad in (0, -1.0, True, "60"):
        with pytest.raises(ValueError, match="max_seconds must be a number > 0 or None"):
            LatencyObjective(max_seconds=bad)


def test_the_string_and_the_keywords_make_the_same_objective():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_objective("error", {}) is None
        assert resolve_objective("latency", {}) == LatencyObjective()
    with pytest.warns(DeprecationWarning, match="latency_batch, latency_slack"):
        legacy = resolve_objective("latency", {"latency_batch": 4, "latency_slack": 0.2})
    assert legacy == LatencyObjective(batch=4, slack=0.2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'latency_speed'"):
        resolve_objective("latency", {"latency_speed": 1})


def test_plan_warns_on_the_keywords_and_refuses_them_next_to_the_object():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(DeprecationWarning, match="latency_batch"):
        with pytest.raises(ValueError, match="latency_batch must be a positive int"):
            gkpd.plan(net, x, ratio=3, objective="latency", latency_batch=0)
    with pytest.raises(ValueError, match="give the latency settings in the LatencyObjective"):
        with pytest.warns(DeprecationWarning):
            gkpd.plan(net, x, ratio=3, objective=LatencyObjective(), latency_batch=2)
    with pytest.raises(ValueError, match="supported for method 'gkpd' only"):
        gkpd.plan(net, x, ratio=3, method="svd", objective=LatencyObjective())
