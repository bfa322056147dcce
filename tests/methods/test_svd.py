"""SVD with calibration data: the activation-aware truncation (the data-aware baseline that
GKPD's whitened factors are compared with)."""

import pytest
import torch
from testkit.calibration import SmallConvNet, correlated_images
from torch import nn

import gkpd
from gkpd.calibration import Calibration, collect_covariances
from gkpd.whiten import output_error


@pytest.fixture(scope="module")
def setup():
    """``(model, images)``: the model seeded, in eval mode."""
    torch.manual_seed(0)
    return SmallConvNet().eval(), correlated_images()


def effective_weight(layer: nn.Sequential, dense: nn.Module) -> torch.Tensor:
    """The dense weight the two stages of an SVD layer compute (per group for a conv)."""
    first, second = layer[0], layer[1]
    g = getattr(dense, "groups", 1)
    a = first.weight.detach().double().reshape(g, -1, first.weight[0].numel())
    b = second.weight.detach().double().reshape(g, dense.weight.shape[0] // g, -1)
    return (b @ a).reshape(dense.weight.shape)


def errors(model, compressed, plan, images):
    names = [e.name for e in plan.compressed_layers]
    covs = collect_covariances(model, {n: model.get_submodule(n) for n in names},
                               Calibration(images))
    return {n: output_error(model.get_submodule(n).weight,
                            effective_weight(compressed.get_submodule(n), model.get_submodule(n)),
                            covs[n]) for n in names}


def test_calibrated_svd_keeps_the_ranks_and_lowers_the_output_error(setup):
    model, images = setup
    x = images[:1]
    plain, plain_plan = gkpd.compress(model, x, ratio=3.0, method="svd", min_params=0)
    aware, aware_plan = gkpd.compress(model, x, ratio=3.0, method="svd", min_params=0,
                                      calibration=Calibration(images, select=False))
    ranks = [(e.name, e.settings["rank"]) for e in aware_plan.compressed_layers]
    assert ranks == [(e.name, e.settings["rank"]) for e in plain_plan.compressed_layers]
    # plain and grouped convolutions and a linear layer are compressed
    assert {name for name, _ in ranks} >= {"conv2", "conv3", "fc"}
    before, after = errors(model, plain, plain_plan, images), errors(model, aware, aware_plan,
                                                                     images)
    for name in before:
        assert after[name] <= before[name] + 1e-6, name
    assert sum(after.values()) < 0.95 * sum(before.values())
    for entry in aware_plan.compressed_layers:
        assert entry.settings["init"] == "whitened"
        # the recorded output error is the one the built layer has
        assert entry.settings["output_error"] == pytest.approx(after[entry.name], abs=1e-5)
    # the plain plan's built layers are its SVD truncations
    assert "init" not in plain_plan.compressed_layers[0].settings


def test_calibrated_svd_selection_reaches_the_ratio_and_apply_needs_the_data(setup):
    model, images = setup
    for strategy in ("uniform", "global"):
        plan = gkpd.plan(model, images[:1], ratio=3.0, method="svd", strategy=strategy,
                         min_params=0, calibration=Calibration(images, select=True))
        assert plan.achieved_ratio == pytest.approx(3.0, rel=0.05), strategy
    with pytest.raises(ValueError, match="pass calibration= to apply_"):
        gkpd.apply_(SmallConvNet(), plan)
    # a model loaded from a saved plan needs no data: decompose=False
    restored = gkpd.apply_(SmallConvNet(), plan, decompose=False)
    assert isinstance(restored.fc, nn.Sequential)


def test_calibration_is_refused_for_methods_that_cannot_use_it(setup):
    model, images = setup
    with pytest.raises(ValueError, match="calibration is used by methods gkpd, svd only"):
        gkpd.plan(model, images[:1], ratio=3.0, method="tensor_ring", calibration=images)
