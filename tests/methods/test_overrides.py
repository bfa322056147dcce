"""Per-layer overrides: each method takes its own settings, restricts the layer to them,
and refuses keys it does not know."""

import pytest
import torch
from torch import nn

import gkpd


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


X = torch.randn(1, 8, 8, 8)
CASES = {
    "svd": ({"rank": 3}, {"rank": 3}),
    "tucker": ({"ranks": [4, 6]}, {"ranks": [4, 6], "iterations": 10}),
    "cp": ({"rank": 7}, {"rank": 7, "iterations": 50, "seed": 0}),
    "tensor_train": ({"rank": 5}, {"rank": 5, "in_modes": [4, 4], "out_modes": [4, 4]}),
    "tensor_ring": ({"rank": 2}, {"rank": 2, "in_modes": [4, 4], "out_modes": [4, 4]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_override_fixes_the_layer_setting(name):
    override, settings = CASES[name]
    plan = gkpd.plan(Net(), X, ratio=2.0, method=name, strategy="global", min_params=0,
                     overrides={"b": override, "c": "skip"}, tolerance=0.5)
    entry = plan.layer("b")
    assert entry.method == name and entry.settings == settings
    assert plan.layer("c").reason == "skipped by override"
    assert not plan.layer("c").compressed
    text = plan.table()
    assert "settings" in text.splitlines()[0]


@pytest.mark.parametrize("name", list(CASES))
def test_unknown_or_bad_override_keys_are_refused(name):
    with pytest.raises(ValueError, match=f"which method '{name}' does not take"):
        gkpd.plan(Net(), X, ratio=2.0, method=name, min_params=0,
                  overrides={"b": {"a_shape": (4, 4, 3, 1)}})
    bad = {"ranks": [0, 3]} if name == "tucker" else {"rank": 0}
    with pytest.raises(ValueError, match="overrides\\['b'\\]"):
        gkpd.plan(Net(), X, ratio=2.0, method=name, min_params=0, overrides={"b": bad})


def test_gkpd_still_validates_its_own_keys():
    with pytest.raises(ValueError, match="does not take"):
        gkpd.plan(Net(), X, ratio=2.0, min_params=0, overrides={"b": {"ranks": [2, 2]}})
    with pytest.raises(ValueError, match="rank without an a_shape"):
        gkpd.plan(Net(), X, ratio=2.0, min_params=0, overrides={"b": {"rank": 2}})
    with pytest.raises(TypeError, match="overrides\\['b'\\] must be 'skip' or a dict"):
        gkpd.plan(Net(), X, ratio=2.0, min_params=0, overrides={"b": 3})


def test_override_forces_a_layer_the_defaults_keep_dense():
    plan = gkpd.plan(Net(), X, ratio=1.5, method="svd", strategy="global",
                     min_params=10**6, overrides={"b": {"rank": 2}}, tolerance=0.9)
    assert plan.layer("b").settings == {"rank": 2}
    assert "too small" in plan.layer("a").reason
