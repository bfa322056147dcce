"""tensor_train and tensor_ring: the layer equals the dense layer whose weight is rebuilt from
its cores (by TensorLy and an index-by-index inverse of the tensorization written here), for
conv1d/2d/3d and linear layers with every conv option; shapes, errors and fresh builds."""

import copy
import itertools
import math

import pytest
import tensorly as tl
import torch
from tensorly.tr_tensor import tr_to_tensor
from tensorly.tt_tensor import tt_to_tensor
from testkit.layers import layer_input, rel
from torch import nn

from gkpd.methods import get_method
from gkpd.methods._tensorized import balanced_factors, default_modes, tensor_modes
from gkpd.plan.schema import LayerPlan

METHODS = ["tensor_train", "tensor_ring"]
TO_TENSOR = {"tensor_train": tt_to_tensor, "tensor_ring": tr_to_tensor}


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense(kind, *args, **kwargs):
    torch.manual_seed(len(args) + 7 * len(kwargs))
    return kind(*args, **kwargs, dtype=torch.float64)


LAYERS = {
    "2d stride pad": lambda: _dense(nn.Conv2d, 8, 12, 3, stride=2, padding=1),
    "2d reflect dilation no bias": lambda: _dense(
        nn.Conv2d, 6, 8, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1),
        padding_mode="reflect", bias=False,
    ),
    "2d circular": lambda: _dense(nn.Conv2d, 8, 8, 3, padding=1, padding_mode="circular"),
    "2d same replicate": lambda: _dense(
        nn.Conv2d, 4, 8, 4, padding="same", dilation=2, padding_mode="replicate"
    ),
    "2d grouped": lambda: _dense(nn.Conv2d, 8, 16, 3, padding=1, groups=2),
    "2d 1x1": lambda: _dense(nn.Conv2d, 16, 12, 1, stride=2),
    "1d same": lambda: _dense(nn.Conv1d, 8, 12, 5, padding="same"),
    "3d": lambda: _dense(nn.Conv3d, 4, 8, 3, stride=(1, 2, 1), padding=1),
    "linear": lambda: _dense(nn.Linear, 24, 18),
}


def _entry(module, method, rank):
    return LayerPlan(
        name="layer", module_type=type(module).__name__, weight_shape=tuple(module.weight.shape),
        input_shape=(1,), dense_params=0, dense_macs=0, method=method, settings={"rank": rank},
    )


def _weight_from_cores(name, layer, dense):
    """The dense weight from the cores: TensorLy's full tensor, then each entry placed by
    its (f, c, k) index, f and c row-major over their mode factors."""
    with tl.backend_context("pytorch"):
        full = TO_TENSOR[name]([c.detach() for c in layer.cores])
    shape = dense.weight.shape
    kk = math.prod(shape[2:])
    in_modes, out_modes = layer.in_modes, layer.out_modes
    full = full.reshape(kk, *(c * f for c, f in zip(in_modes, out_modes, strict=True)))
    weight = torch.zeros(shape[0], shape[1], kk, dtype=full.dtype)
    for cs in itertools.product(*map(range, in_modes)):
        for fs in itertools.product(*map(range, out_modes)):
            c = f = 0
            for ci, n in zip(cs, in_modes, strict=True):
                c = c * n + ci
            for fi, n in zip(fs, out_modes, strict=True):
                f = f * n + fi
            pairs = tuple(ci * fn + fi for ci, fi, fn in zip(cs, fs, out_modes, strict=True))
            weight[f, c, :] = full[(slice(None), *pairs)]
    return weight.reshape(shape)


@pytest.mark.parametrize("case", list(LAYERS))
@pytest.mark.parametrize("name", METHODS)
def test_layer_equals_dense_layer_with_weight_from_cores(name, case):
    dense = LAYERS[case]()
    method = get_method(name)
    assert method.supports(dense) is None
    entry = _entry(dense, name, 2)
    layer = method.build(dense, entry, decompose=True)
    weight = _weight_from_cores(name, layer, dense)
    torch.testing.assert_close(layer.reconstruct_weight(), weight, rtol=1e-12, atol=1e-12)
    oracle = copy.deepcopy(dense)
    with torch.no_grad():
        oracle.weight.copy_(weight)
    x = layer_input(dense)
    assert rel(layer(x), oracle(x)) < 1e-10
    # the recorded error is the error of what was built, and it falls with the rank
    error = method.exact_error(dense, entry)
    assert error == pytest.approx(rel(weight, dense.weight), abs=1e-9)
    assert 0 < error < 1
    top = method.max_rank(tensor_modes(dense.weight.shape, layer.in_modes, layer.out_modes))
    assert method.exact_error(dense, _entry(dense, name, top)) <= error + 1e-12
    # gradients reach every core
    layer(x).square().sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_tensor_train_at_full_rank_is_the_dense_layer():
    for dense in (LAYERS["2d stride pad"](), LAYERS["linear"]()):
        method = get_method("tensor_train")
        in_modes, out_modes = default_modes(dense.weight.shape)
        entry = _entry(dense, "tensor_train", 10**6)
        with pytest.raises(ValueError, match="exceeds"):
            method.build(dense, entry, decompose=True)
        modes = tensor_modes(dense.weight.shape, in_modes, out_modes)
        layer = method.build(dense, _entry(dense, "tensor_train", method.max_rank(modes)),
                             decompose=True)
        x = layer_input(dense)
        assert rel(layer(x), dense(x)) < 1e-10


@pytest.mark.parametrize("name", METHODS)
def test_fresh_build_has_the_same_shapes_and_loads_the_weights(name):
    dense = LAYERS["2d stride pad"]()
    method = get_method(name)
    entry = _entry(dense, name, 2)
    decomposed = method.build(dense, entry, decompose=True)
    fresh = method.build(dense, entry, decompose=False)
    assert [p.shape for p in fresh.parameters()] == [p.shape for p in decomposed.parameters()]
    assert fresh.rank == 2
    # fresh cores rebuild a weight of about torch's default scale
    scale = float(fresh.reconstruct_weight().detach().std() / dense.weight.detach().std())
    assert 0.2 < scale < 5
    fresh.load_state_dict(decomposed.state_dict())
    x = layer_input(dense)
    assert torch.equal(fresh(x), decomposed(x))
    assert decomposed.macs((1, 8, 9, 8)) == 12 * 8 * 9 * 5 * 4


def test_modes_and_core_shapes():
    assert balanced_factors(64, 2) == [8, 8]
    assert balanced_factors(32, 2) == [8, 4]
    assert balanced_factors(10, 3) == [5, 2, 1]
    assert default_modes((32, 16, 3, 3)) == ([4, 4], [4, 8])
    assert default_modes((10, 64)) == ([4, 4, 4], [1, 2, 5])
    tt = get_method("tensor_train").core_shapes([9, 64, 64], 12)
    assert tt == [(1, 9, 9), (9, 64, 12), (12, 64, 1)]
    tr = get_method("tensor_ring").core_shapes([9, 64, 16], 3)
    assert tr == [(3, 9, 3), (3, 64, 3), (3, 16, 3)]
    assert get_method("tensor_ring").core_shapes([9, 16, 16], 5) is None  # 25 > 16
    assert get_method("tensor_ring").max_rank([9, 16, 16]) == 4


@pytest.mark.parametrize("name", METHODS)
def test_bad_settings_and_layers_are_refused(name):
    dense = LAYERS["2d stride pad"]()
    method = get_method(name)
    with pytest.raises(ValueError, match="settings"):
        method.build(dense, LayerPlan("layer", "Conv2d", (12, 8, 3, 3), (1,), 0, 0), decompose=True)
    with pytest.raises(ValueError, match="rank of layer 'layer' must be a positive int"):
        method.build(dense, _entry(dense, name, 0), decompose=True)
    bad = _entry(dense, name, 2)
    bad.settings["in_modes"] = [3, 3]
    with pytest.raises(ValueError, match="in_modes of layer 'layer'"):
        method.build(dense, bad, decompose=True)
    assert "transposed" in method.supports(nn.ConvTranspose2d(4, 4, 3))
    assert "no fewer than the dense" in method.supports(nn.Conv2d(2, 2, 1))
