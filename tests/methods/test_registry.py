"""The declared method interfaces: registering a method, and the planner and ``apply_``
dispatching on its kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gkpd
from gkpd.methods import (
    _METHODS,
    GKPD,
    KroneckerConfig,
    LayerMethod,
    ModelMethod,
    Prune,
    finetune_lr,
    get_method,
    method_names,
    register_method,
)
from gkpd.plan.candidates import Candidates


class HalfRank(LayerMethod):
    """A third-party layer method: a linear layer as two halves of an SVD (rank = half)."""

    name = "half_rank"

    def supports(self, module):
        return None if isinstance(module, nn.Linear) else "linear layers only"

    def candidates(self, ctx):
        out, inp = ctx.module.weight.shape
        rank = min(out, inp) // 2
        params = rank * (out + inp) + ctx.bias_params
        return Candidates(torch.tensor([params]).numpy(), torch.tensor([rank * inp]).numpy(),
                          torch.tensor([0.5]).double().numpy(), [rank])

    def describe(self, ctx, config, entry):
        entry.settings = {"rank": config}

    def exact_error(self, module, entry):
        return 0.5

    def build(self, module, entry, *, decompose):
        rank = entry.settings["rank"]
        first = nn.Linear(module.in_features, rank, bias=False)
        return nn.Sequential(first, nn.Linear(rank, module.out_features))


@pytest.fixture
def registry():
    saved = dict(_METHODS)
    yield
    _METHODS.clear()
    _METHODS.update(saved)


def test_the_builtin_methods_declare_their_kind():
    for name in method_names():
        method = get_method(name)
        assert isinstance(method, ModelMethod if name == "prune" else LayerMethod), name
    assert not isinstance(Prune(), LayerMethod)
    assert not hasattr(Prune(), "candidates")


def test_a_registered_layer_method_plans_and_applies(registry):
    assert register_method(HalfRank()).name == "half_rank"
    assert "half_rank" in method_names()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(2, 64)
    compressed, plan = gkpd.compress(model, x, ratio=1.3, method="half_rank", min_params=0,
                                     tolerance=0.5)
    assert plan.method == "half_rank" and plan.compressed_layers
    assert compressed(x).shape == (2, 64)


def test_register_method_refuses_clearly(registry):
    with pytest.raises(TypeError, match="instance, got the class HalfRank"):
        register_method(HalfRank)
    with pytest.raises(TypeError, match="LayerMethod or ModelMethod"):
        register_method(object())
    with pytest.raises(ValueError, match="'gkpd' is already registered.*replace=True"):
        register_method(GKPD())
    replacement = GKPD()
    register_method(replacement, replace=True)
    assert get_method("gkpd") is replacement


def test_layer_methods_get_defaults():
    method = HalfRank()
    assert method.family(3) is None  # no families: every layer searches everything
    assert method.check_available() is None


def test_gkpd_configurations_are_typed():
    config = KroneckerConfig((2, 2), (3, 3), 1, "a_first")
    assert config.a_shape == (2, 2) and config == ((2, 2), (3, 3), 1, "a_first")
    assert GKPD().family(config) == (2, 2)


def test_the_finetuning_lr_of_a_plan_is_its_most_delicate_methods(registry):
    assert finetune_lr(["gkpd", "dense", "tucker"]) == 0.01
    assert finetune_lr(["auto", "gkpd", "cp", "dense"]) == 0.001  # cp's factors need small steps
    assert finetune_lr(["dense", "not-registered-here"]) == 0.01  # nothing known: the default

    class Gentle(HalfRank):
        name = "gentle"
        finetune_lr = 1e-4

    register_method(Gentle())
    assert HalfRank.finetune_lr == 0.01  # a method that says nothing gets the default
    assert finetune_lr(["gkpd", "gentle"]) == 1e-4
