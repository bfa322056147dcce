"""One name for how a Kronecker layer runs: ``path`` (``"auto"``, a stage order, a channel
path or ``"weight"``); the names it had before (``order``, ``resolve_order``) keep working
with a ``DeprecationWarning``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gkpd
from gkpd.counting import count_model
from gkpd.layers.base import ORDER_CHOICES, PATH_CHOICES
from gkpd.methods import KroneckerConfig


def _layer() -> gkpd.KroneckerConv2d:
    torch.manual_seed(0)
    return gkpd.KroneckerConv2d.from_dense(nn.Conv2d(4, 8, 3, padding=1), a_shape=(2, 1, 3, 1),
                                           rank=2)


def test_the_old_layer_names_read_and_write_the_path():
    layer = _layer()
    with pytest.deprecated_call(match="KroneckerConv2d.order is deprecated: use .path"):
        layer.order = "a_first"
    assert layer.path == "a_first" and "path='a_first'" in repr(layer)
    with pytest.deprecated_call(match="order is deprecated"):
        assert layer.order == "a_first"
    with pytest.deprecated_call(match="resolve_order is deprecated: use .resolve_path"):
        assert layer.resolve_order((1, 4, 6, 6)) == layer.resolve_path((1, 4, 6, 6)) == "a_first"
    with pytest.raises(ValueError, match="path 'fast' is not supported"):
        layer.path = "fast"
    assert ORDER_CHOICES == PATH_CHOICES


def test_counts_reports_and_configs_name_the_path():
    layer = _layer()
    layer.path = "weight"
    x = torch.randn(1, 4, 6, 6)
    counted = count_model(nn.Sequential(layer), x)["0"]
    summary = gkpd.summary(nn.Sequential(layer), x)
    assert counted.path == summary["0"].path == "weight"
    assert "path" in summary.table().splitlines()[0].split()
    assert summary.to_dict()["layers"][0]["path"] == "weight"
    with pytest.deprecated_call(match="LayerCount.order is deprecated"):
        assert counted.order == "weight"
    with pytest.deprecated_call(match="LayerSummary.order is deprecated"):
        assert summary["0"].order == "weight"
    config = KroneckerConfig((2, 2), (3, 3), 1, "b_first")
    with pytest.deprecated_call(match="KroneckerConfig.order is deprecated"):
        assert config.order == config.path == "b_first"
