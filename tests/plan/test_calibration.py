"""Data-aware planning: gkpd.plan/compress/apply_ with calibration data."""

import pytest
import torch
from testkit.calibration import SmallConvNet, correlated_images
from torch.utils.data import DataLoader, TensorDataset

import gkpd
from gkpd.calibration import Calibration, collect_covariances
from gkpd.whiten import InputCovariance, output_error


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmallConvNet().eval()


@pytest.fixture(scope="module")
def images():
    return correlated_images()


def _factors(entry):
    """A GKPD entry's factor shape and rank (``None``s for a dense layer)."""
    return entry.settings.get("a_shape"), entry.settings.get("rank")


def output_errors(model, compressed, plan, images):
    """Each compressed layer's relative output error on ``images`` (teacher inputs)."""
    names = [e.name for e in plan.compressed_layers]
    covs = collect_covariances(model, {n: model.get_submodule(n) for n in names},
                               Calibration(images))
    return {n: output_error(model.get_submodule(n).weight,
                            compressed.get_submodule(n).reconstruct_weight(), covs[n])
            for n in names}


def test_whitened_plan_has_lower_output_error_than_plain(model, images):
    x = images[:1]
    plain, plain_plan = gkpd.compress(model, x, ratio=3.0, min_params=0)
    # select=False keeps the plain plan's shapes and ranks: only the factors differ
    aware, aware_plan = gkpd.compress(model, x, ratio=3.0, min_params=0,
                                      calibration=Calibration(images, select=False))
    assert [_factors(e) for e in aware_plan.compressed_layers] == [
        _factors(e) for e in plain_plan.compressed_layers
    ]
    before = output_errors(model, plain, plain_plan, images)
    after = output_errors(model, aware, aware_plan, images)
    for name in before:
        assert after[name] <= before[name] + 1e-6, name
    assert sum(after.values()) < 0.95 * sum(before.values())
    entry = aware_plan.compressed_layers[0]
    assert entry.settings["init"] == "whitened"
    # the recorded output error is the one measured on the compressed layer
    assert entry.settings["output_error"] == pytest.approx(after[entry.name], abs=1e-5)
    assert aware_plan.options["calibration"]["select"] is False


def test_selection_by_output_error_reaches_the_ratio(model, images):
    for strategy in ("uniform", "global"):
        small, plan = gkpd.compress(model, images[:1], ratio=3.0, min_params=0,
                                    strategy=strategy,
                                    calibration=Calibration(images, select=True))
        assert plan.achieved_ratio == pytest.approx(3.0, rel=0.03)
        assert plan.options["calibration"]["select"] is True
        with torch.no_grad():
            assert torch.isfinite(small(images[:4])).all()


def test_data_loader_and_tensor_give_the_same_plan(model, images):
    loader = DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=20)
    a = gkpd.plan(model, images[:1], ratio=3.0, min_params=0, calibration=images)
    b = gkpd.plan(model, images[:1], ratio=3.0, min_params=0, calibration=loader)
    assert [_factors(e) for e in a.layers] == [_factors(e) for e in b.layers]
    for x, y in zip(a.compressed_layers, b.compressed_layers, strict=True):
        assert x.settings["output_error"] == pytest.approx(y.settings["output_error"], rel=1e-4)


def test_samples_limits_the_data_used(model, images):
    cov_all = collect_covariances(model, {"conv1": model.conv1}, Calibration(images, samples=None))
    cov_ten = collect_covariances(model, {"conv1": model.conv1}, Calibration(images, samples=10))
    direct = InputCovariance(model.conv1)
    direct.update(images[:10])
    assert torch.allclose(cov_ten["conv1"], direct.matrix)
    assert not torch.allclose(cov_all["conv1"], cov_ten["conv1"])


def test_sequential_whitens_on_the_compressed_inputs(model, images):
    x = images[:1]
    seq, plan = gkpd.compress(model, x, ratio=3.0, min_params=0,
                              calibration=Calibration(images, select=False, sequential=True))
    once, _ = gkpd.compress(model, x, ratio=3.0, min_params=0,
                            calibration=Calibration(images, select=False))
    first = plan.compressed_layers[0].name
    last = plan.compressed_layers[-1].name
    # the first layer sees the same inputs either way (the least-squares step keeps its
    # weight but for its small ridge); a later one does not
    assert torch.allclose(seq.get_submodule(first).reconstruct_weight(),
                          once.get_submodule(first).reconstruct_weight(), atol=1e-3)
    assert not torch.allclose(seq.get_submodule(last).reconstruct_weight(),
                              once.get_submodule(last).reconstruct_weight(), atol=1e-5)
    with torch.no_grad():  # and the whole model ends closer to the dense one
        dense = model(images)
        e_seq = (seq(images) - dense).norm()
        e_once = (once(images) - dense).norm()
    assert e_seq < 1.05 * e_once


def test_plan_json_keeps_the_calibration_and_apply_needs_the_data(model, images, tmp_path):
    plan = gkpd.plan(model, images[:1], ratio=3.0, min_params=0, calibration=images)
    again = gkpd.CompressionPlan.from_json(plan.to_json())
    assert again.options["calibration"] == plan.options["calibration"]
    import copy

    with pytest.raises(ValueError, match="pass calibration= to apply_"):
        gkpd.apply_(copy.deepcopy(model), again)
    applied = gkpd.apply_(copy.deepcopy(model), again, calibration=images)
    # saving and loading builds the layers without data
    gkpd.save(tmp_path / "m", applied, again)
    loaded = gkpd.load(tmp_path / "m", SmallConvNet())
    with torch.no_grad():
        assert torch.allclose(loaded(images[:4]), applied(images[:4]), atol=1e-5)


@pytest.mark.parametrize(
    "data, match",
    [
        (torch.empty(0, 3, 8, 8), "empty tensor"),
        ([], "empty: it yielded no batch"),
        (torch.full((4, 3, 8, 8), float("nan")), "NaN"),
        (torch.randn(4, 1, 8, 8), "failed on a calibration batch"),
        ("images/", "calibration data must be"),
        ([1, 2], "a calibration batch must be"),
    ],
    ids=["empty-tensor", "empty-loader", "nan", "wrong-shape", "string", "not-tensors"],
)
def test_bad_calibration_data_is_refused(model, images, data, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gkpd.plan(model, images[:1], ratio=3.0, min_params=0, calibration=data)


def test_bad_calibration_settings_and_methods(model, images):
    with pytest.raises(ValueError, match="samples"):
        Calibration(images, samples=0)
    with pytest.raises(ValueError, match="damping"):
        Calibration(images, damping=-0.1)
    with pytest.raises(ValueError, match="sequential"):
        Calibration(images, sequential="yes")
    with pytest.raises(ValueError, match="methods gkpd, svd only"):
        gkpd.plan(model, images[:1], ratio=3.0, method="cp", calibration=images)


def test_compress_reads_the_calibration_data_once(model, images):
    class Counted:
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return iter(images.split(32))

    gkpd.compress(model, images[:1], ratio=3.0, min_params=0, calibration=Counted())
    assert Counted.passes == 1  # apply_ on the copy reuses the plan's covariances
    other = SmallConvNet().eval()  # another model's values: collected again
    gkpd.compress(other, images[:1], ratio=3.0, min_params=0,
                  calibration=Calibration(Counted()))
    assert Counted.passes == 2


def test_keyword_inputs_calibrate_given_whole_or_from_a_loader():
    from testkit.keyword_models import KeywordModel, TokenDataset, token_batch

    torch.manual_seed(0)
    model = KeywordModel().eval()
    data = token_batch(batch=100, length=6)  # given whole: fed in more than one chunk
    loader = DataLoader(TokenDataset(data), batch_size=16)  # (dict of inputs, labels) batches
    tokens = model.embedding(data["input_ids"][:70]).reshape(-1, 64).double()
    direct = tokens.T @ tokens / len(tokens)  # the input second moment of `up`
    for source in (data, loader):
        cov = collect_covariances(model, {"up": model.up}, Calibration(source, samples=70))
        torch.testing.assert_close(cov["up"], direct, rtol=1e-5, atol=1e-6)
    x = token_batch()
    small, plan = gkpd.compress(model, x, ratio=2, calibration=data)
    assert plan.options["calibration"]["samples"] == 512
    assert plan.achieved_ratio == pytest.approx(2, rel=0.03)
    with torch.no_grad():
        assert small(**x)["logits"].shape == model(**x)["logits"].shape
