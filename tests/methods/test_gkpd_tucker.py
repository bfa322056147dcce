"""gkpd_tucker (Tucker-2 projections around a Kronecker-sum core): the replacement equals the
conv whose weight is composed here from its stages (torch.kron for the core, independently of
gkpd's Kronecker code); the errors the planner records are those of the built layers; full
ranks give the dense layer; plans reach the ratio and count what runs."""

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from testkit.layers import (
    CONVS,
    EXAMPLE,
    TinyCNN,
    apply_and_count,
    layer_input,
    make_entry,
    rel,
    with_weight,
)
from torch import nn

import gkpd
from gkpd.apply import apply_
from gkpd.layers import KroneckerConvNd
from gkpd.methods import LayerContext, get_method
from gkpd.methods.gkpd_tucker import rank_grid
from gkpd.plan import CompressionPlan
from gkpd.plan.candidates import Candidates

pytestmark = pytest.mark.usefixtures("one_thread")

METHOD = "gkpd_tucker"


def _compose(layer):
    """``U_out · (Σ_r kron(a_r, b_r)) · U_inᵀ`` read from the three stages."""
    first, core, last = layer
    assert isinstance(first, nn.Conv1d | nn.Conv2d | nn.Conv3d)
    assert isinstance(core, KroneckerConvNd)
    kron = sum(torch.kron(a, b) for a, b in zip(core.a, core.b, strict=True))
    return torch.einsum("oi...,fo,ic->fc...", kron, last.weight.flatten(1),
                        first.weight.flatten(1))


def _settings(dense, rank=2):
    # a pointwise kernel has one channel rank (r_in = r_out)
    r_in, r_out = (6, 6) if math.prod(dense.kernel_size) == 1 else (3, 4)
    n = dense.weight.dim() - 2
    a = [2, 3] + [1] * n
    b = [r_out // 2, r_in // 3, *dense.kernel_size]
    return {"ranks": [r_in, r_out], "a_shape": a, "b_shape": b, "rank": rank}


@pytest.mark.parametrize("case", list(CONVS))
def test_replacement_equals_conv_with_composed_weight(case):
    dense = CONVS[case]()
    method = get_method(METHOD)
    assert method.supports(dense) is None
    entry = make_entry(dense, METHOD, _settings(dense))
    layer = method.build(dense, entry, decompose=True)
    weight = _compose(layer)
    x = layer_input(dense)
    assert rel(layer(x), with_weight(dense, weight)(x)) < 1e-10
    torch.testing.assert_close(layer.weight, weight)  # what a parent reading .weight gets
    error = method.exact_error(dense, entry)
    assert error == pytest.approx(rel(weight, dense.weight.detach()), abs=1e-9)
    assert 0 < error < 1


@pytest.mark.parametrize("case", list(CONVS))
def test_full_ranks_are_the_dense_layer(case):
    dense = CONVS[case]()
    f, c, *k = dense.weight.shape
    kk = math.prod(k)
    r_in, r_out = min(c, f * kk), min(f, c * kk)
    n = len(k)
    # the core's full Kronecker rank: min(r_in, r_out·∏K)
    a, b = [1, r_in] + [1] * n, [r_out, 1, *k]
    settings = {"ranks": [r_in, r_out], "a_shape": a, "b_shape": b,
                "rank": min(r_in, r_out * kk)}
    entry = make_entry(dense, METHOD, settings)
    layer = get_method(METHOD).build(dense, entry, decompose=True)
    x = layer_input(dense)
    assert rel(layer(x), dense(x)) < 1e-10
    assert get_method(METHOD).exact_error(dense, entry) < 1e-7


def _planned(strategy):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    plan = gkpd.plan(model, EXAMPLE, ratio=2.0, method=METHOD, strategy=strategy,
                     min_params=500)
    return model, plan, apply_and_count(model, plan)


@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_plan_reaches_ratio_records_the_built_errors_and_counts_match(strategy):
    model, plan, compressed = _planned(strategy)
    assert abs(plan.achieved_ratio / 2.0 - 1) <= 0.05
    for entry in plan.compressed_layers:
        layer = compressed.get_submodule(entry.name)
        dense = model.get_submodule(entry.name)
        weight = _compose(layer)
        # the candidate table's error is exactly the built layer's
        assert entry.relative_error == pytest.approx(rel(weight, dense.weight), abs=1e-6)
        x = torch.randn(2, *entry.input_shape[1:])
        assert torch.allclose(layer(x), with_weight(dense, weight)(x), atol=1e-4)
    assert "linear" in plan.layer("fc1").reason
    assert "groups=4" in plan.layer("grouped").reason
    again = CompressionPlan.from_json(plan.to_json())
    fresh = apply_(copy.deepcopy(model), again, decompose=False)
    fresh.load_state_dict(compressed.state_dict())
    assert torch.equal(fresh(EXAMPLE), compressed(EXAMPLE))


def test_save_and_load_round_trip(tmp_path):
    model, plan, compressed = _planned("uniform")
    gkpd.save(tmp_path / "saved", compressed, plan)
    loaded = gkpd.load(tmp_path / "saved", copy.deepcopy(model))
    assert torch.equal(loaded(EXAMPLE), compressed(EXAMPLE))
    # a dense model saved with the plan is refused (it would not load)
    with pytest.raises(ValueError, match="apply the plan"):
        gkpd.save(tmp_path / "dense", model, plan)


def test_more_budget_never_costs_accuracy():
    """The search space at a larger budget holds the smaller budget's picks."""
    model = TinyCNN().eval()
    errors = []
    for ratio in (2.2, 1.8, 1.3):
        plan = gkpd.plan(model, EXAMPLE, ratio=ratio, method=METHOD, strategy="global",
                         min_params=500, tolerance=0.05)
        errors.append(sum(e.relative_error ** 2 for e in plan.compressed_layers))
    assert errors[0] >= errors[1] >= errors[2]


def test_override_fixes_the_configuration():
    model = TinyCNN().eval()
    override = {"ranks": [8, 8], "a_shape": [2, 2, 1, 1], "rank": 3}
    plan = gkpd.plan(model, EXAMPLE, ratio=1.5, method=METHOD, min_params=500,
                     overrides={"conv1": override}, tolerance=0.5)
    settings = plan.layer("conv1").settings
    assert settings["ranks"] == [8, 8] and settings["a_shape"] == [2, 2, 1, 1]
    assert settings["b_shape"] == [4, 4, 3, 3] and settings["rank"] == 3


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"a_shape": [2, 2, 1, 1]}, "without its channel ranks"),
        ({"ranks": [8, 8], "rank": 2}, "rank without an a_shape"),
        ({"ranks": [8]}, r"must be \[r_in, r_out\]"),
        ({"ranks": [8, 8], "a_shape": [3, 2, 1, 1]}, "core of ranks"),
        ({"ranks": [8, 8], "a_shape": [2, 2, 1, 1], "rank": 99}, "out of range"),
        ({"rank_in": 3}, "does not take"),
    ],
)
def test_bad_overrides_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        gkpd.plan(TinyCNN().eval(), EXAMPLE, ratio=1.5, method=METHOD, min_params=500,
                  overrides={"conv1": override})


def test_bad_settings_are_refused():
    dense = CONVS["2d stride pad"]()
    method = get_method(METHOD)
    with pytest.raises(ValueError, match="settings"):
        method.build(dense, make_entry(dense, METHOD, {}), decompose=True)
    bad_ranks = {**_settings(dense), "ranks": [7, 2]}
    with pytest.raises(ValueError, match="layer 'layer'"):
        method.build(dense, make_entry(dense, METHOD, bad_ranks), decompose=True)
    bad_core = {**_settings(dense), "b_shape": [2, 1, 3, 1]}
    with pytest.raises(ValueError, match="the core"):
        method.build(dense, make_entry(dense, METHOD, bad_core), decompose=True)


def test_unsupported_layers_say_why():
    method = get_method(METHOD)
    assert "linear" in method.supports(nn.Linear(64, 64))
    assert "groups=2" in method.supports(nn.Conv2d(8, 8, 3, groups=2))
    assert "transposed" in method.supports(nn.ConvTranspose2d(4, 4, 3))
    assert "no fewer than the dense" in method.supports(nn.Conv2d(2, 2, 1))


def test_rank_grid():
    for n in (1, 5, 16, 30, 64, 100):
        grid = rank_grid(n)
        assert grid == sorted(set(grid)) and grid[-1] == n and max(grid) <= n
        assert set(range(1, min(n, 8) + 1)) <= set(grid)


def _brute_force_front(dense, input_shape, max_params):
    """Every (channel ranks, core split, rank) of the searched pairs, its error from the
    singular values of the rearranged HOSVD core (no pruning), reduced to the Pareto front."""
    from gkpd.decompose import divisors, rearrange
    from gkpd.methods.gkpd_tucker import channel_pairs

    w = dense.weight.detach().double()
    f, c, *k = w.shape
    u_out = torch.linalg.svd(w.reshape(f, -1), full_matrices=False).U
    u_in = torch.linalg.svd(w.transpose(0, 1).reshape(c, -1), full_matrices=False).U
    total = float(w.square().sum())
    params, errors, configs = [], [], []
    for r_in, r_out in channel_pairs(c, f, math.prod(k)):
        core = torch.einsum("fc...,fo,ci->oi...", w, u_out[:, :r_out], u_in[:, :r_in])
        lost = total - float(core.square().sum())
        for a in itertools.product(*(divisors(n) for n in core.shape)):
            b = tuple(n // x for n, x in zip(core.shape, a, strict=True))
            if math.prod(a) in (1, core.numel()):
                continue
            s2 = torch.linalg.svdvals(rearrange(core, a)).square()
            for rank in range(1, len(s2) + 1):
                p = c * r_in + f * r_out + rank * (math.prod(a) + math.prod(b)) + f
                if p <= max_params:
                    params.append(p)
                    errors.append(math.sqrt(max(lost + float(s2[rank:].sum()), 0) / total))
                    configs.append((r_in, r_out, a, rank))
    return Candidates(np.array(params), np.zeros(len(params), dtype=np.int64),
                      np.array(errors), configs).pareto()


def test_pruned_search_finds_the_brute_force_front():
    """The search skips channel ranks that cannot reach the front and makes configurations
    only near it; the front it hands the planner is the exhaustive one."""
    torch.manual_seed(3)
    dense = nn.Conv2d(8, 12, 3, padding=1, dtype=torch.float64)
    input_shape = (1, 8, 6, 6)
    dense_params = dense.weight.numel() + dense.bias.numel()
    for ratio in (1.5, 4.0):
        ctx = LayerContext("layer", dense, input_shape, dense_params, 0, None, ratio)
        found = get_method(METHOD).candidates(ctx).pareto()
        oracle = _brute_force_front(dense, input_shape, ctx.max_params())
        assert len(found) == len(oracle) > 5
        assert np.array_equal(found.params, oracle.params)
        assert np.allclose(found.error, oracle.error, atol=1e-6)
