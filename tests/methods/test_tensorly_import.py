"""Without TensorLy, the methods that need it say so (naming the method and the extra)
before any work; the others go on."""

import sys

import pytest
import torch
from torch import nn

import gkpd


class Boom(nn.Module):
    """A model that fails if planning gets as far as running it."""

    def forward(self, x):
        raise AssertionError("planning ran the model before checking TensorLy")


@pytest.mark.parametrize("name", ["tucker", "cp", "tensor_train", "tensor_ring"])
def test_missing_tensorly_is_named_before_any_work(monkeypatch, name):
    for module in [m for m in sys.modules if m == "tensorly" or m.startswith("tensorly.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "tensorly", None)
    expected = f"method '{name}' needs TensorLy: pip install 'gkpd\\[baselines\\]'"
    with pytest.raises(ImportError, match=expected):
        gkpd.plan(Boom(), torch.randn(1, 3), ratio=2.0, method=name)


def test_svd_and_gkpd_need_no_tensorly(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorly", None)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    for name in ("svd", "gkpd"):
        plan = gkpd.plan(model, torch.randn(1, 32), ratio=2.0, method=name, min_params=0)
        assert plan.compressed_layers
