"""Baseline methods (svd, tucker, cp): each replacement equals the conv/linear with the weight
composed from its factors (composed here, independently of the methods), and its ``weight`` is
that composed weight; svd and tucker at
full rank are the dense layer; the planner reaches the ratio with them and counts what runs."""

import copy
import math

import pytest
import torch
from testkit.layers import (
    CONVS,
    EXAMPLE,
    TinyCNN,
    apply_and_count,
    dense_layer,
    layer_input,
    make_entry,
    rel,
    with_weight,
)
from torch import nn

import gkpd
from gkpd.apply import apply_
from gkpd.methods import cp as cp_module
from gkpd.methods import get_method, method_names
from gkpd.plan import CompressionPlan

BASELINES = ["svd", "tucker", "cp"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- oracles


def _compose_svd(layer, dense):
    if isinstance(dense, nn.Linear):
        return layer[1].weight @ layer[0].weight
    g = dense.groups
    first, second = layer[0].weight, layer[1].weight
    rank = first.shape[0] // g
    per_group = second.reshape(g, -1, rank) @ first.reshape(g, rank, -1)
    return per_group.reshape(dense.weight.shape)


def _compose_tucker(layer, dense):
    u_in = layer[0].weight.flatten(1)  # (r_in, C)
    core = layer[1].weight  # (r_out, r_in, *K)
    u_out = layer[2].weight.flatten(1)  # (F, r_out)
    return torch.einsum("oi...,fo,ic->fc...", core, u_out, u_in)


def _compose_cp(layer, dense):
    first, *stages, last = list(layer)
    t = torch.einsum("fr,rc->fcr", last.weight.flatten(1), first.weight.flatten(1))
    n = len(dense.kernel_size)
    staged = {}
    for stage in stages:
        (axis,) = [i for i, k in enumerate(stage.kernel_size) if k > 1] or [
            i for i, p in enumerate(stage.padding) if p
        ]
        staged[axis] = stage.weight.flatten(1).T  # (K_axis, R)
    for axis in range(n):
        factor = staged.get(axis, torch.ones(1, t.shape[-1], dtype=t.dtype))
        t = t.unsqueeze(-2) * factor  # append the axis before R
    return t.sum(-1)


COMPOSE = {"svd": _compose_svd, "tucker": _compose_tucker, "cp": _compose_cp}


# ----------------------------------------------------------------------------- layers

SETTINGS = {"svd": {"rank": 3}, "tucker": {"ranks": [3, 3]}, "cp": {"rank": 5}}


def _check_factors(name, dense, settings):
    method = get_method(name)
    assert method.supports(dense) is None
    entry = make_entry(dense, name, settings)
    layer = method.build(dense, entry, decompose=True)
    assert all(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) for m in layer)
    weight = COMPOSE[name](layer, dense)
    x = layer_input(dense)
    assert rel(layer(x), with_weight(dense, weight)(x)) < 1e-10
    torch.testing.assert_close(layer.weight, weight)  # what a parent reading .weight gets
    # the recorded error is the error of what was built
    error = method.exact_error(dense, entry)
    assert error == pytest.approx(rel(weight, dense.weight.detach()), abs=1e-9)
    assert 0 < error < 1
    return layer


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("name", BASELINES)
def test_replacement_equals_conv_with_composed_weight(name, case):
    _check_factors(name, CONVS[case](), SETTINGS[name])


def test_svd_grouped_and_linear_equal_composed_weight():
    _check_factors("svd", dense_layer(nn.Conv2d, 8, 12, 3, groups=4, padding=1), {"rank": 2})
    _check_factors("svd", dense_layer(nn.Linear, 10, 7), {"rank": 3})


@pytest.mark.parametrize("case", list(CONVS))
def test_svd_and_tucker_at_full_rank_are_the_dense_layer(case):
    dense = CONVS[case]()
    f, c, *k = dense.weight.shape
    kk = math.prod(k)
    full = {
        "svd": {"rank": min(f, c * kk)},
        "tucker": {"ranks": [min(c, f * kk), min(f, c * kk)]},
    }
    x = layer_input(dense)
    for name, settings in full.items():
        entry = make_entry(dense, name, settings)
        layer = get_method(name).build(dense, entry, decompose=True)
        assert rel(layer(x), dense(x)) < 1e-10, name
        assert get_method(name).exact_error(dense, entry) < 1e-10


def test_svd_full_rank_grouped_and_linear_are_dense():
    for dense, rank in (
        (dense_layer(nn.Conv2d, 8, 12, 3, groups=4, padding=1), 3),
        (dense_layer(nn.Linear, 10, 7), 7),
    ):
        entry = make_entry(dense, "svd", {"rank": rank})
        layer = get_method("svd").build(dense, entry, decompose=True)
        x = layer_input(dense)
        assert rel(layer(x), dense(x)) < 1e-10


def test_cp_is_deterministic_and_fits_better_with_rank():
    dense = CONVS["2d stride pad"]()
    method = get_method("cp")
    entry = make_entry(dense, "cp", {"rank": 6})
    first = method.build(dense, entry, decompose=True)
    cp_module._CACHE.clear()
    second = method.build(dense, entry, decompose=True)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    errors = [method.exact_error(dense, make_entry(dense, "cp", {"rank": r})) for r in (2, 8, 30)]
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("name", BASELINES)
def test_bad_settings_are_refused(name):
    dense = CONVS["2d stride pad"]()
    method = get_method(name)
    with pytest.raises(ValueError, match="settings"):
        method.build(dense, make_entry(dense, name, {}), decompose=True)
    bad = {"svd": {"rank": 0}, "tucker": {"ranks": [7, 2]}, "cp": {"rank": -1}}[name]
    with pytest.raises(ValueError, match="layer"):
        method.build(dense, make_entry(dense, name, bad), decompose=True)


def test_unsupported_layers_say_why():
    linear = nn.Linear(64, 64)
    grouped = nn.Conv2d(8, 8, 3, groups=2)
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    assert "linear" in get_method("tucker").supports(linear)
    assert "linear" in get_method("cp").supports(linear)
    assert "groups=2" in get_method("tucker").supports(grouped)
    assert "groups=2" in get_method("cp").supports(grouped)
    assert get_method("svd").supports(grouped) is None
    assert "no fewer than the dense" in get_method("svd").supports(depthwise)
    assert "transposed" in get_method("svd").supports(nn.ConvTranspose2d(4, 4, 3))
    assert set(BASELINES) <= set(method_names())


# ----------------------------------------------------------------------------- planner



@pytest.mark.parametrize("strategy", ["uniform", "global"])
@pytest.mark.parametrize("name", BASELINES)
def test_plan_reaches_ratio_and_applied_model_counts_match(name, strategy):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    plan = gkpd.plan(model, EXAMPLE, ratio=2.0, method=name, strategy=strategy, min_params=500)
    assert abs(plan.achieved_ratio / 2.0 - 1) <= 0.05
    compressed = apply_and_count(model, plan)
    for entry in plan.compressed_layers:
        assert entry.method == name and entry.settings
        layer = compressed.get_submodule(entry.name)
        dense = model.get_submodule(entry.name)
        composed = with_weight(dense, COMPOSE[name](layer, dense))
        x = torch.randn(2, *entry.input_shape[1:])
        assert torch.allclose(layer(x), composed(x), atol=1e-4)
    # unsupported layers stay dense and say why
    assert "first layer" in plan.layer("stem").reason
    if name != "svd":
        assert "linear" in plan.layer("fc1").reason
        assert "groups=4" in plan.layer("grouped").reason
    else:
        assert plan.layer("grouped").compressed
    # the plan survives JSON; applying it without decomposing gives loadable shapes
    again = CompressionPlan.from_json(plan.to_json())
    fresh = apply_(copy.deepcopy(model), again, decompose=False)
    fresh.load_state_dict(compressed.state_dict())
    assert torch.equal(fresh(EXAMPLE), compressed(EXAMPLE))


def test_svd_plan_takes_the_errors_of_its_spectrum(monkeypatch):
    """One SVD per layer: the candidate table's errors are the built layers' (a second
    SVD per layer in the plan's description doubled svd planning time on ResNet-18)."""
    svd = type(get_method("svd"))
    real, calls = svd.exact_error, []
    monkeypatch.setattr(svd, "exact_error",
                        lambda self, *args: calls.append(1) or real(self, *args))
    torch.manual_seed(0)
    model = TinyCNN().eval()
    plan = gkpd.plan(model, EXAMPLE, ratio=2.0, method="svd", min_params=500)
    assert plan.compressed_layers and not calls
    for entry in plan.compressed_layers:
        assert entry.relative_error == pytest.approx(
            real(get_method("svd"), model.get_submodule(entry.name), entry), abs=1e-9)


def test_gkpd_overrides_are_refused_by_baselines():
    model = TinyCNN().eval()
    with pytest.raises(ValueError, match="does not take"):
        gkpd.plan(
            model,
            EXAMPLE,
            ratio=2.0,
            method="svd",
            min_params=500,
            overrides={"conv1": {"a_shape": (4, 4, 3, 1)}},
        )
