"""TensorLy-Torch peers in place of the convolutions a GKPD plan compresses, at its sizes."""

import pytest
import torch
from speed_models import INPUT, RATIO, tiny_cnn
from torch import nn

import gkpd
from gkpd.bench.peers import PEERS, tltorch_peer


def test_tltorch_peers_replace_the_planned_convolutions():
    tltorch = pytest.importorskip("tltorch")
    model = tiny_cnn()
    x = torch.randn(3, *INPUT)
    plan = gkpd.plan(model, x[:1], ratio=RATIO)
    for factorization in PEERS:
        peer = tltorch_peer(model, plan, factorization)
        layers = [m for m in peer.modules() if isinstance(m, tltorch.FactorizedConv)]
        assert len(layers) == len(plan.compressed_layers) == 2
        assert all(layer.weight.name.lower() in {"cp", "tucker", "tt"} for layer in layers)
        assert sum(p.numel() for p in peer.parameters()) == pytest.approx(plan.params, rel=0.05)
        with torch.no_grad():
            assert peer(x).shape == model(x).shape == (3, 10)
    assert isinstance(model[0], nn.Conv2d)  # the model itself is untouched
    # the benchmark's peers: random factors with the dense layer's bias and weight norm
    peer = tltorch_peer(model, plan, "tt", decompose=False)
    for name in ("0", "2"):
        layer, dense = peer.get_submodule(name), model.get_submodule(name)
        assert isinstance(layer, tltorch.FactorizedConv)
        norm = float(layer.weight.to_tensor().norm())
        assert norm == pytest.approx(float(dense.weight.norm()), rel=1e-4)
        assert torch.equal(layer.bias, dense.bias)
    with pytest.raises(ValueError, match="factorization"):
        tltorch_peer(model, plan, "svd")
