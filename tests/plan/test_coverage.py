"""The plan says what it leaves as it is: parameters no method compresses, layers that keep
little of their weight, and, for a ratio out of reach, what holds the rest and which options
(that exist) would change it."""

import logging

import pytest
import torch
from torch import nn

import gkpd
from gkpd.plan import UnreachableRatio

pytestmark = pytest.mark.usefixtures("one_thread")


class Pairwise(nn.Module):
    """Most parameters in an ``nn.Bilinear``, which no method compresses."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(100, 32)
        self.pair = nn.Bilinear(32, 32, 128)
        self.unused = nn.Linear(64, 64)
        self.head = nn.Linear(128, 16)
        self.out = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.embedding(x)
        return self.out(self.head(self.pair(tokens[:, 0], tokens[:, -1])))


@pytest.mark.parametrize("strategy", ["uniform", "global"])
def test_an_unreachable_ratio_names_what_holds_the_parameters(strategy):
    torch.manual_seed(0)
    model = Pairwise()
    x = torch.randint(0, 100, (2, 7))
    with pytest.raises(UnreachableRatio) as error:
        gkpd.plan(model, x, ratio=2, strategy=strategy)
    message = str(error.value)
    total = sum(p.numel() for p in model.parameters())
    pair = sum(p.numel() for p in model.pair.parameters())
    share = f"{pair:,} ({100 * pair / total:.1f}%)"
    assert f"Parameters no method compresses: {share} in Bilinear 'pair'" in message
    assert "Not planned, as the forward pass on example_input does not call them" in message
    assert "Linear 'unused'" in message
    assert "layer 'out' kept dense: too small (160 < min_params 1024)" in message
    assert "min_params= / --min-params" in message  # the keyword and the gkpd compress flag
    assert "allow_more_macs" not in message  # it would not help here
    assert error.value.best < 1.1
    plan = gkpd.plan(model, x, ratio=1.02, strategy=strategy, min_params=0)  # within reach
    assert any("Bilinear 'pair'" in note for note in plan.notes)
    assert any("Linear 'unused'" in note for note in plan.notes)
    assert "note: parameters no method compresses" in plan.table()


def test_an_unreachable_ratio_suggests_methods_that_take_the_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4096), nn.Linear(4096, 4))  # svd cannot shrink '0'
    with pytest.raises(UnreachableRatio, match="'0' kept dense: rank 1 has 4097 weights.*"
                       "methods that take them: 'gkpd'.*--method"):
        gkpd.plan(model, torch.randn(1, 1), ratio=3, method="svd", min_params=0)


def test_layers_that_keep_little_of_their_weight_are_flagged(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))
    with caplog.at_level(logging.WARNING, logger="gkpd.plan.planner"):
        plan = gkpd.plan(model, torch.randn(1, 128), ratio=30, tolerance=0.2)
    weak = [e for e in plan.compressed_layers if e.relative_error >= 0.9]
    assert weak and all(e.reason.startswith("compressed; keeps little") for e in weak)
    note = next(n for n in plan.notes if "keep little of their weight" in n)
    assert all(e.name in note for e in weak) and "--exclude" in note
    assert "max_layer_error=0.9 (--max-layer-error)" in note
    assert any("keep little of their weight" in r.message for r in caplog.records)
    assert plan.totals()["notes"] == plan.notes
    assert gkpd.CompressionPlan.from_json(plan.to_json()).notes == plan.notes


def test_a_plan_that_keeps_its_weights_has_no_warning(resnet32, caplog):
    with caplog.at_level(logging.WARNING, logger="gkpd.plan.planner"):
        plan = gkpd.plan(resnet32, torch.randn(1, 1, 28, 28), ratio=2)
    assert not caplog.records
    assert plan.notes == [next(n for n in plan.notes if "BatchNorm2d" in n)]


def test_max_layer_error_keeps_layers_that_would_keep_little_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 64))
    with torch.no_grad():  # layer '0' is nearly low rank, layer '2' is noise
        model[0].weight.copy_(torch.randn(512, 4) @ torch.randn(4, 512) / 16
                              + 0.02 * torch.randn(512, 512))
    x = torch.randn(1, 512)
    plain = gkpd.plan(model, x, ratio=2, min_params=0)
    # within its ratio limits the noise keeps at best 0.49 of its error
    assert plain.layer("2").compressed and plain.layer("2").relative_error >= 0.3
    kept = gkpd.plan(model, x, ratio=2, min_params=0, max_layer_error=0.3)
    assert not kept.layer("2").compressed and "max_layer_error 0.3" in kept.layer("2").reason
    assert kept.compressed_layers and all(e.relative_error < 0.3 for e in kept.compressed_layers)
    assert kept.achieved_ratio == pytest.approx(2, rel=0.03)
    assert kept.options["max_layer_error"] == 0.3
    for bad in (0, 1.5, "0.9", True):
        with pytest.raises(ValueError, match="max_layer_error must be a number in"):
            gkpd.plan(model, x, ratio=2, max_layer_error=bad)
    with pytest.raises(ValueError, match="max_layer_error is for layer methods"):
        gkpd.plan(model, x, ratio=2, method="prune", max_layer_error=0.5)
