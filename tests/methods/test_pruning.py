"""The ``prune`` baseline: whole-model channel pruning with torch-pruning, behind plan/apply."""

import copy
import json
import sys

import pytest
import torch
from torch import nn

import gkpd
from gkpd.apply import apply_
from gkpd.counting import module_params
from gkpd.methods import get_method
from gkpd.plan import CompressionPlan
from gkpd.plan.budget import UnreachableRatio

pytest.importorskip("torch_pruning")

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


def resnet32():
    torch.manual_seed(0)
    model = gkpd.models.create("resnet32", num_classes=10, in_channels=1)
    # trained-looking BatchNorm statistics, so that a mix-up of kept channels shows
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def plans():
    model = resnet32()
    return model, {r: gkpd.plan(model, X, ratio=r, method="prune") for r in (5, 10)}


@pytest.mark.parametrize("ratio", [5, 10])
def test_resnet32_reaches_ratio(plans, ratio):
    model, all_plans = plans
    plan = all_plans[ratio]
    assert plan.method == "prune"
    assert plan.dense_params == module_params(model)
    assert plan.achieved_ratio == pytest.approx(ratio, rel=0.05)
    assert plan.macs < plan.dense_macs
    pruned = {e.name for e in plan.compressed_layers if e.settings["root"]}
    # inner channels only: conv1 of every block; the stem, block outputs and fc stay
    assert pruned == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(5)}
    assert plan.layer("conv1").method == "dense"
    assert plan.layer("fc").method == "dense"
    coupled = plan.layer("layer2.1.conv2")
    assert coupled.method == "prune" and coupled.settings["coupled_to"] == ["layer2.1.conv1"]
    assert coupled.settings["out_channels_removed"] == []
    root = plan.layer("layer2.1.conv1")
    assert root.settings["in_channels_removed"] == []
    assert coupled.settings["in_channels_removed"] == root.settings["out_channels_removed"]
    assert 0 < root.relative_error < 1
    # the plan is JSON and comes back equal
    again = CompressionPlan.from_json(plan.to_json())
    assert again.layer("layer2.1.conv1").settings == root.settings
    json.dumps(plan.to_dict())


def test_plan_is_pure(plans):
    model, _ = plans
    fresh = resnet32()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not model.training


def test_removes_the_smallest_l1_filters(plans):
    model, all_plans = plans
    entry = all_plans[5].layer("layer3.2.conv1")
    norms = model.layer3[2].conv1.weight.detach().abs().flatten(1).sum(1)
    removed = entry.settings["out_channels_removed"]
    kept = sorted(set(range(64)) - set(removed))
    assert norms[removed].max() <= norms[kept].min()


@pytest.mark.parametrize("ratio", [5, 10])
def test_apply_matches_plan_and_runs(plans, ratio):
    model, all_plans = plans
    plan = all_plans[ratio]
    compressed = apply_(copy.deepcopy(model).train(), plan)
    assert compressed.training  # modes kept
    assert module_params(compressed) == plan.params
    for entry in plan.layers:
        assert module_params(compressed.get_submodule(entry.name)) == entry.params, entry.name
    y = compressed.eval()(X)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    # the surviving channels keep their weights and BatchNorm statistics
    removed = plan.layer("layer1.3.conv1").settings["out_channels_removed"]
    kept = sorted(set(range(16)) - set(removed))
    dense_block, block = model.layer1[3], compressed.layer1[3]
    assert torch.equal(block.conv1.weight, dense_block.conv1.weight[kept])
    assert torch.equal(block.bn1.running_mean, dense_block.bn1.running_mean[kept])
    assert torch.equal(block.conv2.weight, dense_block.conv2.weight[:, kept])


def test_compress_counts_what_runs(plans):
    model, all_plans = plans
    compressed, plan = gkpd.compress(model, X, ratio=5, method="prune")
    assert plan.to_dict() == all_plans[5].to_dict()  # deterministic
    count = gkpd.counting.count_model(compressed, X[:1])
    assert count.total_macs == plan.macs


def test_replay_on_fresh_model_gives_same_shapes(plans):
    model, all_plans = plans
    plan = all_plans[10]
    a = apply_(copy.deepcopy(model), plan)
    b = apply_(gkpd.models.create("resnet32", num_classes=10, in_channels=1), plan, decompose=False)
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    shapes_b = {k: v.shape for k, v in b.state_dict().items()}
    assert shapes_a == shapes_b


def test_save_load_round_trip(plans, tmp_path):
    model, all_plans = plans
    plan = all_plans[5]
    compressed = apply_(copy.deepcopy(model), plan).eval()
    gkpd.save(tmp_path / "pruned", compressed, plan)
    loaded = gkpd.load(tmp_path / "pruned", gkpd.models.create("resnet32", in_channels=1))
    assert torch.equal(loaded(X), compressed(X))


def test_unreachable_ratio(plans):
    model, _ = plans
    with pytest.raises(UnreachableRatio, match=r"ratio 200 is unreachable.*largest reachable"):
        gkpd.plan(model, X, ratio=200, method="prune")


def test_missing_torch_pruning(monkeypatch, plans):
    model, all_plans = plans
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    message = r"method 'prune' needs torch-pruning: pip install 'gkpd\[baselines\]'"
    with pytest.raises(ImportError, match=message):
        gkpd.plan(model, X, ratio=5, method="prune")
    with pytest.raises(ImportError, match=message):
        apply_(copy.deepcopy(model), all_plans[5])


def test_bad_arguments(plans):
    model, _ = plans
    with pytest.raises(ValueError, match="strategy 'uniform' only"):
        gkpd.plan(model, X, ratio=5, method="prune", strategy="global")
    with pytest.raises(ValueError, match="must be 'skip'"):
        gkpd.plan(model, X, ratio=5, method="prune", overrides={"fc": {"a_shape": (1, 1)}})
    with pytest.raises(TypeError, match="use gkpd.apply_"):
        get_method("prune").build(model.fc, None, decompose=True)


def test_exclude_and_skip_keep_layers(plans):
    model, _ = plans
    plan = gkpd.plan(
        model,
        X,
        ratio=3,
        method="prune",
        exclude="re:layer1\\..*",
        overrides={"layer2.0.conv1": "skip"},
    )
    roots = {e.name for e in plan.compressed_layers if e.settings["root"]}
    assert not any(n.startswith("layer1.") for n in roots) and "layer2.0.conv1" not in roots
    assert plan.layer("layer1.0.conv1").reason == "excluded"
    assert plan.achieved_ratio == pytest.approx(3, rel=0.03)


class MobileNetish(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 48, 1),
            nn.BatchNorm2d(48),
            nn.ReLU6(),  # expand
            nn.Conv2d(48, 48, 3, padding=1, groups=48),
            nn.BatchNorm2d(48),
            nn.ReLU6(),  # dw
            nn.Conv2d(48, 32, 1),
            nn.BatchNorm2d(32),  # project
            nn.Conv2d(32, 32, 3, padding=1, groups=4),
            nn.ReLU(),  # grouped
            nn.Conv2d(32, 64, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )


def test_depthwise_and_grouped_sequential():
    torch.manual_seed(0)
    model = MobileNetish().eval()
    x = torch.randn(2, 3, 16, 16)
    plan = gkpd.plan(model, x, ratio=2, method="prune", min_params=0)
    assert plan.achieved_ratio == pytest.approx(2, rel=0.03)
    roots = {e.name for e in plan.compressed_layers if e.settings["root"]}
    assert roots == {"3", "13"}  # the expand conv (with its depthwise conv) and the last conv
    assert "grouped" in plan.layer("9").reason  # feeds the grouped conv: kept
    assert "grouped" in plan.layer("11").reason
    assert plan.layer("6").method == "prune"  # the depthwise conv shrinks with its input
    compressed = apply_(copy.deepcopy(model), plan)
    assert module_params(compressed) == plan.params
    assert compressed[6].groups == compressed[6].out_channels == compressed[3].out_channels
    assert compressed(x).shape == (2, 10)


def test_a_graph_torch_pruning_cannot_build_is_a_clear_error(monkeypatch):
    """Torch-Pruning 1.6 fails inside its graph code on some models (Hugging Face's GPT-2:
    a TypeError in its concat index mapping); the error names the method and the cause."""
    import torch_pruning

    def fail(*args, **kwargs):
        return None + 1  # the TypeError torch-pruning raises on GPT-2

    monkeypatch.setattr(torch_pruning.DependencyGraph, "build_dependency", fail)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"method 'prune' cannot prune this Sequential: "
                       r"Torch-Pruning .* failed to build its dependency graph \(TypeError"):
        gkpd.plan(model, torch.randn(1, 3, 8, 8), ratio=2, method="prune")


def test_nothing_prunable():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with pytest.raises(ValueError, match="no layer's output channels can be pruned"):
        gkpd.plan(model, torch.randn(1, 3, 8, 8), ratio=2, method="prune")


def test_cli_compress_prune(tmp_path, capsys):
    from gkpd.cli import main

    out = tmp_path / "pruned"
    code = main(
        [
            "compress",
            "resnet32_fashion_mnist",
            "--ratio",
            "5",
            "--method",
            "prune",
            "--out",
            str(out),
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["method"] == "prune"
    assert result["achieved_ratio"] == pytest.approx(5, rel=0.05)
    plan = CompressionPlan.load(out / "plan.json")
    model = gkpd.load(out, gkpd.models.create("resnet32", num_classes=10, in_channels=1))
    assert module_params(model) == plan.params


class _KeywordMLP(nn.Module):
    """``forward(features, scale=None)``, returning a dict (as a Hugging Face model does)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, features, scale=None):
        hidden = torch.relu(self.fc1(features))
        logits = self.fc2(hidden if scale is None else hidden * scale)
        return {"logits": logits, "probabilities": logits.softmax(-1)}


def test_a_model_called_with_keywords_is_pruned_and_replayed():
    torch.manual_seed(0)
    model = _KeywordMLP().eval()
    x = {"features": torch.randn(3, 32), "scale": torch.ones(3, 1)}
    plan = gkpd.plan(model, x, ratio=1.5, method="prune", min_params=0)
    assert plan.achieved_ratio == pytest.approx(1.5, rel=0.03)
    assert [e.name for e in plan.compressed_layers if e.settings["root"]] == ["fc1"]
    assert plan.options["input_keywords"] == ["features", "scale"]
    pruned = apply_(copy.deepcopy(model), plan)
    with torch.no_grad():
        want, got = model(**x), pruned(**x)
    assert list(got) == ["logits", "probabilities"]
    assert got["logits"].shape == want["logits"].shape
    kept = pruned.fc1.out_features
    assert kept < 64 and pruned.fc2.in_features == kept
    # replayed on a fresh model from the plan's JSON alone (zeros of the recorded inputs)
    fresh = apply_(_KeywordMLP(), CompressionPlan.from_json(plan.to_json()), decompose=False)
    assert fresh.fc1.out_features == kept and fresh.fc2.in_features == kept
