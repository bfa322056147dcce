"""What every factored layer shares (``gkpd.layers.base``): ``weight`` reads like a dense
layer's for parent modules that read it. Oracle: the dense op run with it gives the layer's
output (and it is ``to_dense()``'s weight where there is one), for the Kronecker conv, linear
and embedding layers and the tensor-train/ring layers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gkpd
from gkpd.methods import get_method
from gkpd.plan.schema import LayerPlan

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensorized(method: str) -> nn.Module:
    dense = nn.Linear(12, 8)
    entry = LayerPlan(name="fc", module_type="Linear", weight_shape=(8, 12), input_shape=(1, 12),
                      dense_params=0, dense_macs=0, method=method, settings={"rank": 2})
    return get_method(method).build(dense, entry, decompose=True)


def _conv(layer, x, weight):
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                    layer.groups)


# name: (layer, input, the dense op run with a weight: the oracle of what `weight` must be)
LAYERS = {
    "linear": lambda: (
        gkpd.KroneckerLinear.from_dense(nn.Linear(12, 8), a_shape=(2, 3), rank=2),
        torch.randn(3, 12), lambda layer, x, w: F.linear(x, w, layer.bias)),
    "conv2d grouped": lambda: (
        gkpd.KroneckerConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1, groups=2),
                                        a_shape=(2, 2, 1, 3), rank=2),
        torch.randn(2, 8, 5, 5), _conv),
    "embedding": lambda: (
        gkpd.KroneckerEmbedding.from_dense(nn.Embedding(12, 8, padding_idx=0), a_shape=(3, 2),
                                           rank=2),
        torch.tensor([[0, 3, 11]]), lambda layer, x, w: F.embedding(x, w, layer.padding_idx)),
    "tensor_train": lambda: (
        _tensorized("tensor_train"), torch.randn(3, 12),
        lambda layer, x, w: F.linear(x, w, layer.bias)),
    "tensor_ring": lambda: (
        _tensorized("tensor_ring"), torch.randn(3, 12),
        lambda layer, x, w: F.linear(x, w, layer.bias)),
}


@pytest.mark.parametrize("kind", LAYERS)
def test_weight_is_what_the_dense_op_runs_with_and_carries_gradients(kind):
    torch.manual_seed(0)
    layer, x, dense_op = LAYERS[kind]()
    torch.testing.assert_close(dense_op(layer, x, layer.weight), layer(x))
    if hasattr(layer, "to_dense"):
        torch.testing.assert_close(layer.weight, layer.to_dense().weight)
    layer.weight.square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_weight_is_built_on_each_read_and_follows_the_factors():
    layer = LAYERS["linear"]()[0].eval()
    with torch.no_grad():
        first = layer.weight
        layer.a.mul_(2)
        torch.testing.assert_close(layer.weight, 2 * first)
    assert layer.weight is not layer.weight  # not kept: the model's memory stays its factors'


def test_weight_cannot_be_assigned():
    layer = LAYERS["linear"]()[0]
    with pytest.raises(AttributeError, match=r"KroneckerLinear\.weight is built from the "
                                             r"layer's factors and cannot be assigned"):
        layer.weight = torch.zeros(8, 12)
