import copy

import pytest
import torch
from torch import nn

import gkpd
from gkpd.apply import apply_
from gkpd.counting import count_model
from gkpd.decompose import full_rank
from gkpd.plan import CompressionPlan, RatioMissed, UnreachableRatio, planner

pytestmark = pytest.mark.usefixtures("one_thread")


EXAMPLE = torch.randn(1, 1, 28, 28)
PLANS: dict = {}


def _plan(model, ratio, strategy):
    key = (ratio, strategy)
    if key not in PLANS:
        PLANS[key] = gkpd.plan(model, EXAMPLE, ratio=ratio, strategy=strategy)
    return PLANS[key]


@pytest.mark.parametrize("strategy", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [2.0, 5.0, 10.0])
def test_resnet32_reaches_ratio_and_applied_model_matches(resnet32, ratio, strategy):
    plan = _plan(resnet32, ratio, strategy)
    assert abs(plan.achieved_ratio / ratio - 1) <= 0.03
    assert plan.dense_params == sum(p.numel() for p in resnet32.parameters())
    compressed = apply_(copy.deepcopy(resnet32), plan)
    counted = count_model(compressed, EXAMPLE)
    assert counted.total_params == plan.params
    assert counted.total_macs == plan.macs
    for entry in plan.layers:
        assert entry.macs <= entry.dense_macs, entry.name
        if entry.compressed:
            assert entry.params < entry.dense_params
    # the first conv on one input channel and the tiny classifier stay dense, and say why
    assert "first layer" in plan.layer("conv1").reason
    assert "too small" in plan.layer("fc").reason
    # each entry names the path its layer runs (order "auto": a channel path where the factor
    # shapes allow one)
    for entry in plan.compressed_layers:
        layer = compressed.get_submodule(entry.name)
        assert layer.path == "auto"
        assert layer.resolve_path(EXAMPLE.shape) == entry.settings["path"]
    if (ratio, strategy) == (5.0, "uniform"):  # its factors have a channel dim of 1
        assert any(entry.settings["path"].endswith("_channels")
                   for entry in plan.compressed_layers)


def test_uniform_compresses_every_layer_alike(resnet32):
    plan = _plan(resnet32, 5.0, "uniform")
    ratios = [e.dense_params / e.params for e in plan.compressed_layers]
    assert len(ratios) == 30
    assert max(ratios) / min(ratios) < 1.6


def test_global_has_no_more_summed_error_than_uniform(resnet32):
    err = {s: sum(e.relative_error**2 for e in _plan(resnet32, 5.0, s).layers)
           for s in ("uniform", "global")}
    assert err["global"] <= err["uniform"] * 1.05


def test_plan_is_pure_and_error_is_the_applied_error(resnet32):
    before = copy.deepcopy(resnet32.state_dict())
    plan = gkpd.plan(resnet32, EXAMPLE, ratio=1.1, include="re:layer2\\..*")
    for k, v in resnet32.state_dict().items():
        assert torch.equal(v, before[k])
    compressed = apply_(copy.deepcopy(resnet32), plan)
    for entry in plan.compressed_layers:
        assert entry.name.startswith("layer2.")
        dense = resnet32.get_submodule(entry.name).weight
        rebuilt = compressed.get_submodule(entry.name).reconstruct_weight().detach()
        dense = dense.detach()
        measured = float((dense - rebuilt).norm() / dense.norm())
        assert measured == pytest.approx(entry.relative_error, rel=1e-3, abs=1e-5)


def test_full_rank_plan_reproduces_dense_outputs(resnet32):
    model = copy.deepcopy(resnet32).double()
    plan = CompressionPlan.from_json(_plan(resnet32, 5.0, "uniform").to_json())
    for entry in plan.compressed_layers:
        entry.settings["rank"] = full_rank(entry.settings["a_shape"], entry.settings["b_shape"])
    compressed = apply_(copy.deepcopy(model), plan)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compressed(x), model(x), rtol=1e-9, atol=1e-9)


def test_plan_json_round_trip(tmp_path, resnet32):
    plan = _plan(resnet32, 5.0, "global")
    path = plan.save(tmp_path / "plan.json")
    loaded = CompressionPlan.load(path)
    assert loaded == plan
    assert f"{plan.params:,}" in str(loaded)


def test_overrides_fix_a_layer_and_skip_another(resnet32):
    plan = gkpd.plan(
        resnet32, EXAMPLE, ratio=3.0,
        overrides={"layer3.0.conv2": {"a_shape": (8, 8, 3, 1), "rank": 2},
                   "layer3.1.conv1": "skip"},
    )
    fixed = plan.layer("layer3.0.conv2")
    factors = {k: fixed.settings[k] for k in ("a_shape", "b_shape", "rank")}
    assert factors == {"a_shape": [8, 8, 3, 1], "b_shape": [8, 8, 1, 3], "rank": 2}
    assert not plan.layer("layer3.1.conv1").compressed
    assert "override" in plan.layer("layer3.1.conv1").reason


def test_exclude_by_type_name_and_regex(resnet32):
    plan = gkpd.plan(resnet32, EXAMPLE, ratio=1.5,
                     exclude=["layer1.0.conv1", "re:layer3\\.[0-3]\\..*"])
    assert plan.layer("layer1.0.conv1").reason == "excluded"
    assert plan.layer("layer3.2.conv2").reason == "excluded"
    assert plan.layer("layer3.4.conv2").compressed
    only_linear = gkpd.plan(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                            torch.randn(1, 64), ratio=2.0, include=nn.Linear)
    assert all(e.compressed for e in only_linear.layers)


def test_grouped_depthwise_3d_1d_and_linear_layers_plan_and_apply():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(8, 32, 3, padding=1), nn.ReLU(),
        nn.Conv3d(32, 32, 3, padding=1, groups=32), nn.ReLU(),
        nn.Conv3d(32, 64, (1, 3, 3), padding=(0, 1, 1), groups=4), nn.ReLU(),
        nn.Flatten(2), nn.Conv1d(64, 64, 5, padding=2, padding_mode="circular"),
        nn.Flatten(), nn.Linear(64 * 64, 64),
    ).double().eval()
    x = torch.randn(2, 8, 4, 4, 4, dtype=torch.float64)
    plan = gkpd.plan(model, x[:1], ratio=3.0, strategy="global", min_params=0)
    assert abs(plan.achieved_ratio / 3.0 - 1) <= 0.03
    compressed = apply_(copy.deepcopy(model), plan)
    assert count_model(compressed, x).total_params == plan.params
    full = CompressionPlan.from_json(plan.to_json())
    for entry in full.compressed_layers:
        entry.settings["rank"] = full_rank(entry.settings["a_shape"], entry.settings["b_shape"])
    exact = apply_(copy.deepcopy(model), full)
    with torch.no_grad():
        torch.testing.assert_close(exact(x), model(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"ratio": 1.0}, ValueError, "ratio must be a finite number > 1"),
        ({"ratio": "5"}, ValueError, "ratio"),
        ({"ratio": float("inf")}, ValueError, "ratio must be a finite number > 1, got inf"),
        ({"include": 3}, TypeError, "include must be a module type, a name"),
        ({"ratio": 500.0}, UnreachableRatio, "largest reachable whole-model ratio is"),
        ({"exclude": "re:nothing\\..*"}, ValueError, "matches no conv, linear or embedding layer"),
        ({"include": "re:("}, ValueError, "not a valid regex"),
        ({"method": "magic"}, ValueError, "unknown method 'magic'"),
        ({"strategy": "best"}, ValueError, "strategy"),
        ({"overrides": {"nope": "skip"}}, ValueError, "'nope'"),
        ({"overrides": {"layer2.0.conv2": {"a_shape": (5, 1, 1, 1)}}}, ValueError,
         "does not divide"),
    ],
)
def test_bad_options_get_clear_errors(resnet32, options, error, match):
    with pytest.raises(error, match=match):
        gkpd.plan(resnet32, EXAMPLE, **{"ratio": 5.0, **options})


def test_a_model_that_is_not_a_module_or_an_empty_example_is_refused(resnet32):
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        gkpd.plan(lambda x: x, EXAMPLE, ratio=5.0)
    with pytest.raises(ValueError, match=r"example_input has an empty batch \(float32\[0, 1"):
        gkpd.plan(resnet32, EXAMPLE[:0], ratio=5.0)


def test_plan_for_another_architecture_is_refused(resnet32):
    plan = _plan(resnet32, 5.0, "uniform")
    other = gkpd.models.create("resnet20", num_classes=10, in_channels=1)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        apply_(other, plan)
    assert other.state_dict().keys() == before.keys()  # nothing swapped half-way


def test_corrupt_plan_json_is_refused(tmp_path, resnet32):
    path = _plan(resnet32, 5.0, "uniform").save(tmp_path / "plan.json")
    path.write_text(path.read_text()[:500])
    with pytest.raises(ValueError, match="truncated or not JSON"):
        CompressionPlan.load(path)
    path.write_text('{"version": 99}')
    with pytest.raises(ValueError, match="version"):
        CompressionPlan.load(path)


def test_shared_search_matches_exhaustive_search_closely(resnet32):
    shared = _plan(resnet32, 5.0, "uniform")
    exhaustive = gkpd.plan(resnet32, EXAMPLE, ratio=5.0, exhaustive=True)
    assert exhaustive.options["exhaustive"] and not shared.options["exhaustive"]
    assert abs(exhaustive.achieved_ratio / 5.0 - 1) <= 0.03

    def summed(plan):
        return sum(e.relative_error**2 for e in plan.layers)

    # layers after the first of each shape only retry the first one's Pareto factor shapes
    assert summed(shared) <= summed(exhaustive) * 1.05


def test_default_strategy_tops_uniform_up_where_its_steps_miss(caplog, monkeypatch):
    # Two same-shaped layers: svd adds 128 parameters a rank to each, so uniform ranks move
    # the total by 256 (8x at rank 4, 10.7x at rank 3) and miss 8192/896 = 9.14x; near_uniform
    # takes rank 3 for both (the largest uniform plan within 896) and raises one to rank 4,
    # exactly 896 parameters.
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    x, ratio = torch.randn(1, 64), 8192 / 896
    with pytest.raises(RatioMissed, match="nearest plan reaches 8.00"):
        gkpd.plan(model, x, ratio=ratio, method="svd", strategy="uniform")
    with caplog.at_level("INFO", logger="gkpd.plan.planner"):
        plan = gkpd.plan(model, x, ratio=ratio, method="svd")
    assert plan.strategy == "near_uniform" and plan.params == 896
    assert sorted(e.settings["rank"] for e in plan.layers) == [3, 4]
    assert "nearest plan reaches 8.00" in plan.options["uniform_error"]
    assert "planning with strategy 'near_uniform'" in caplog.text
    assert "near_uniform (uniform missed the ratio)" in plan.table()
    # the fallback reuses uniform's candidate search (the same min_layer_ratio)
    collected = []
    original = planner._collect
    monkeypatch.setattr(planner, "_collect",
                        lambda *a, **kw: collected.append(1) or original(*a, **kw))
    assert gkpd.plan(model, x, ratio=ratio, method="svd").strategy == "near_uniform"
    assert len(collected) == 1
    explicit = gkpd.plan(model, x, ratio=ratio, method="svd", strategy="near_uniform")
    assert "uniform_error" not in explicit.options
    assert [e.settings for e in explicit.layers] == [e.settings for e in plan.layers]
    # where uniform reaches the ratio, the default is uniform
    assert gkpd.plan(model, x, ratio=8.0, method="svd").strategy == "uniform"


class CalledAtTwoSizes(nn.Module):
    """A conv and a linear each called twice, on inputs of two sizes."""

    def __init__(self):
        super().__init__()
        self.conv, self.linear = nn.Conv2d(16, 16, 3, padding=1), nn.Linear(16, 16)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)
        return (self.conv(x).mean() + self.conv(x[..., ::2, ::2]).mean()
                + self.linear(tokens).mean() + self.linear(x[:, :, 0, 0]).mean())


@pytest.mark.parametrize("method", ["gkpd", "svd"])
def test_a_layer_called_at_several_sizes_is_counted_at_each(method):
    """The oracle: count_model, which counts every call as it runs."""
    torch.manual_seed(0)
    model, x = CalledAtTwoSizes().eval(), torch.randn(1, 16, 8, 8)
    conv_macs = 16 * 16 * 9 * (8 * 8 + 4 * 4)
    plan = gkpd.plan(model, x, ratio=2, min_params=0, method=method, layout="contiguous",
                     tolerance=0.3)
    assert plan.layer("conv").dense_macs == conv_macs
    assert plan.dense_macs == conv_macs + 16 * 16 * (64 + 1)
    counted = {}
    for layer in count_model(apply_(copy.deepcopy(model), plan), x).layers:
        name = layer.name.split(".")[0]
        counted[name] = counted.get(name, 0) + layer.macs
    assert {e.name: e.macs for e in plan.layers} == counted


class _ScaledEmbedding(nn.Embedding):  # as Gemma's word embedding: the lookup, scaled
    def forward(self, ids):
        return super().forward(ids) * self.embedding_dim ** 0.5


class _StandardizedConv(nn.Conv2d):  # as BiT's conv: the weight standardised on every call
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _PlainSubclass(nn.Linear):  # a subclass that computes what nn.Linear does
    pass


class _WithOwnLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = _ScaledEmbedding(200, 32)
        self.conv = _StandardizedConv(8, 32, 3, padding=1)
        self.proj = _PlainSubclass(64, 64)
        self.head = nn.Linear(64, 64)

    def forward(self, ids):
        x = self.embed(ids).unflatten(2, (8, 4)).transpose(1, 2)  # (N, 8, L, 4)
        x = self.conv(x).mean((2, 3)).repeat(1, 2)
        return self.head(self.proj(x))


def test_subclasses_with_a_forward_of_their_own_stay_dense_and_say_why():
    torch.manual_seed(0)
    model = _WithOwnLayers().eval()
    ids = torch.randint(0, 200, (2, 7))
    plan = gkpd.plan(model, ids, ratio=1.2, min_params=0)
    reasons = {e.name: e.reason for e in plan.layers}
    assert "_ScaledEmbedding overrides Embedding.forward" in reasons["embed"]
    assert "_StandardizedConv overrides Conv2d.forward" in reasons["conv"]
    assert {e.name for e in plan.compressed_layers} == {"proj", "head"}
    with pytest.raises(ValueError, match=r"overrides\['embed'\] compresses .* overrides"):
        gkpd.plan(model, ids, ratio=1.2, min_params=0, overrides={"embed": {"rank": 2}})
