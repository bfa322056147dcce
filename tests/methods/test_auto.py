"""``method="auto"``: per layer the best configuration of several layer methods."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gkpd
from gkpd.methods import _METHODS, GKPD, SVD, Auto, Tucker

pytestmark = pytest.mark.usefixtures("one_thread")


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10),
    ).eval()


X = torch.randn(2, 3, 8, 8)


class ExactAuto(Auto):
    """GKPD and SVD only: both tables hold exact errors, so the pick is provably the best."""

    name = "auto-exact"


@pytest.fixture
def exact_auto(monkeypatch):
    method = ExactAuto((GKPD(), SVD()))
    monkeypatch.setitem(_METHODS, method.name, method)
    return method


def test_each_layer_gets_the_least_error_of_its_components(exact_auto):
    model = _convnet()
    kwargs = {"ratio": 3, "strategy": "global", "min_params": 0}
    mixed = gkpd.plan(model, X, method=exact_auto.name, **kwargs)
    singles = [gkpd.plan(model, X, method=m, **kwargs) for m in ("gkpd", "svd")]
    # the global strategy minimises the summed squared error over the union of the tables
    mixed_cost = sum(e.relative_error ** 2 for e in mixed.layers)
    for single in singles:
        assert mixed_cost <= sum(e.relative_error ** 2 for e in single.layers) + 1e-9
    assert mixed.method == exact_auto.name
    assert {e.method for e in mixed.compressed_layers} <= {"gkpd", "svd"}
    assert mixed.achieved_ratio == pytest.approx(3, rel=0.03)


def test_auto_mixes_tucker_and_gkpd_and_round_trips(tmp_path):
    pytest.importorskip("tensorly")
    model = _convnet()
    compressed, plan = gkpd.compress(model, X, ratio=3, method="auto", min_params=0)
    assert plan.method == "auto"
    methods = {e.method for e in plan.compressed_layers}
    assert methods and methods <= {"gkpd", "tucker", "svd"}
    for entry in plan.compressed_layers:  # each layer is its component's replacement
        built = gkpd.methods.get_method(entry.method).build(
            model.get_submodule(entry.name), entry, decompose=False)
        assert type(compressed.get_submodule(entry.name)) is type(built)
    gkpd.save(tmp_path / "m", compressed, plan)
    loaded = gkpd.load(tmp_path / "m", _convnet())
    torch.testing.assert_close(loaded(X), compressed(X))


def test_an_override_names_its_method():
    pytest.importorskip("tensorly")
    model = _convnet()
    plan = gkpd.plan(model, X, ratio=2, method="auto", min_params=0,
                     overrides={"2": {"method": "tucker", "ranks": [4, 4]}})
    entry = plan.layer("2")
    assert (entry.method, entry.settings["ranks"]) == ("tucker", [4, 4])
    with pytest.raises(ValueError, match="must name the method"):
        gkpd.plan(model, X, ratio=2, method="auto", overrides={"2": {"rank": 2}})
    with pytest.raises(ValueError, match="mixes gkpd, tucker, svd; got method 'cp'"):
        gkpd.plan(model, X, ratio=2, method="auto", overrides={"2": {"method": "cp"}})


def test_a_missing_component_is_left_out(monkeypatch, caplog):
    checks = []

    def missing(self):
        checks.append(self.name)
        raise ImportError("method 'tucker' needs TensorLy")

    monkeypatch.setattr(Tucker, "check_available", missing)
    for _ in range(2):
        with caplog.at_level("INFO", logger="gkpd.methods.auto"):
            caplog.clear()
            plan = gkpd.plan(_convnet(), X, ratio=3, method="auto", min_params=0)
        assert {e.method for e in plan.compressed_layers} <= {"gkpd", "svd"}
        assert plan.compressed_layers
        # found once per plan, not once per layer, and said once per plan
        assert caplog.text.count("plans without 'tucker'") == 1
    assert checks == ["tucker", "tucker"]


def test_auto_needs_components():
    with pytest.raises(ValueError, match="at least one component"):
        Auto(())
