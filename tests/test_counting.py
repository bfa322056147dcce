from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import gkpd
from gkpd.counting import (
    conv_macs,
    conv_params,
    count_model,
    kronecker_conv_intermediate_numel,
    kronecker_conv_macs,
    kronecker_conv_order_macs,
    kronecker_params,
    linear_macs,
    module_macs,
    recurrent_macs,
)
from gkpd.decompose import full_rank
from gkpd.geometry import group_split

pytestmark = pytest.mark.usefixtures("one_thread")


def first_stage_numel(layer, x):
    """Elements of what the first of a Kronecker conv's two stages returns, measured."""
    from gkpd.layers import conv

    sizes = []
    real = conv._stage

    def recording(*args):
        y = real(*args)
        sizes.append(y.numel())
        return y

    with mock.patch.object(conv, "_stage", recording):
        layer(x)
    return sizes[0]


def measured_macs(module, x):
    with FlopCounterMode(display=False) as counter:
        module(x)
    return counter.get_total_flops() // 2


def test_dense_closed_forms_match_flop_counter():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=4, bias=False)
    x = torch.randn(2, 16, 15, 15)
    assert conv_macs((15, 15), 16, 32, (3, 3), 2, 1, 1, 4, batch=2) == measured_macs(conv, x)
    assert module_macs(conv, x.shape) == measured_macs(conv, x)
    assert conv_params(16, 32, (3, 3), 4) == sum(p.numel() for p in nn.Conv2d(16, 32, 3,
                                                                             groups=4).parameters())
    assert linear_macs(10, 20, 3) == 600
    up = nn.ConvTranspose2d(8, 12, 3, stride=2, groups=2, bias=False)
    x = torch.randn(2, 8, 5, 5)
    assert module_macs(up, x.shape) == measured_macs(up, x)


@st.composite
def kron_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    f1 = draw(st.sampled_from([1, 2, 4]))
    f2 = draw(st.sampled_from([1, 2, 4]))
    try:
        group_split(groups, (f1,), (f2,))
    except ValueError:
        groups = 1
    c1, c2 = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k1 = tuple(draw(st.integers(1, 3)) for _ in range(2))
    k2 = tuple(draw(st.integers(1, 3)) for _ in range(2))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    dilation = draw(st.integers(1, 2))
    size = draw(st.integers(dilation * 8 + 1, 20))
    return dict(
        a_shape=(f1, c1, *k1), b_shape=(f2, c2, *k2), groups=groups, stride=stride,
        padding=padding, dilation=dilation, size=size,
        rank=draw(st.integers(1, min(full_rank((f1, c1, *k1), (f2, c2, *k2)), 3))),
    )


@settings(deadline=None, max_examples=60)
@given(kron_configs())
def test_kronecker_conv_macs_match_flop_counter(cfg):
    a, b = cfg["a_shape"], cfg["b_shape"]
    f, c = a[0] * b[0] * 1, a[1] * b[1]
    kernel = (a[2] * b[2], a[3] * b[3])
    g = cfg["groups"]
    layer = gkpd.KroneckerConv2d(
        c * g, f, kernel, cfg["stride"], cfg["padding"], cfg["dilation"], g, bias=False,
        a_shape=a, rank=cfg["rank"],
    )
    x = torch.randn(2, c * g, cfg["size"], cfg["size"])
    macs = kronecker_conv_order_macs(
        (cfg["size"],) * 2, a, b, cfg["rank"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], groups=g, batch=2,
    )
    between = kronecker_conv_intermediate_numel(
        (cfg["size"],) * 2, a, b, cfg["rank"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], groups=g, batch=2,
    )
    assert macs == layer.order_macs(x.shape)
    for order in ("b_first", "a_first"):
        layer.path = order
        assert measured_macs(layer, x) == macs[order]
        assert layer.macs(x.shape) == macs[order]
        assert first_stage_numel(layer, x) == between[order]
    assert kronecker_conv_macs(
        (cfg["size"],) * 2, a, b, cfg["rank"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], groups=g, batch=2,
    ) == min(macs.values())


def test_linear_macs_match_flop_counter():
    layer = gkpd.KroneckerLinear(24, 20, bias=False, a_shape=(4, 3), rank=2)
    x = torch.randn(3, 5, 24)
    for order in ("b_first", "a_first"):
        layer.path = order
        assert measured_macs(layer, x) == layer.macs(x.shape)


def test_params():
    layer = gkpd.KroneckerConv2d(64, 64, 3, a_shape=(16, 16, 3, 1), rank=3)
    assert kronecker_params((16, 16, 3, 1), (4, 4, 1, 3), 3, bias=64) == sum(
        p.numel() for p in layer.parameters()
    )


def test_count_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        gkpd.KroneckerConv2d(16, 32, 3, stride=2, padding=1, a_shape=(4, 4, 3, 1), rank=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        gkpd.KroneckerLinear(32, 10, a_shape=(2, 4), rank=2),
        nn.Linear(10, 10),
    )
    model.train()
    x = torch.randn(2, 3, 16, 16)
    counts = count_model(model, x)
    assert model.training and model[1].training
    assert [layer.name for layer in counts.layers] == ["0", "3", "6", "7"]
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    assert counts["0"].macs == 2 * 16 * 256 * 27
    assert counts["3"].macs == model[3].macs((2, 16, 16, 16))
    assert counts["3"].path in ("a_first", "b_first")
    assert counts["3"].output_shape == (2, 32, 8, 8)
    assert counts["7"].macs == 2 * 100
    assert counts.total_macs == sum(layer.macs for layer in counts.layers)
    # every counted MAC is a MAC torch executes
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    assert counts.total_macs == counter.get_total_flops() // 2


# ----------------------------------------------------------------------------- every method
# count_model's MACs must be those of the operations a compressed model runs. The oracle is
# torch's FlopCounterMode (FLOPs/2 = MACs of the convs and matmuls; bias adds, padding and
# activations are not counted by either side). One legitimate difference: a tensor-train/ring
# layer rebuilds its weight from its cores on every call (once per call, whatever the batch);
# by convention its MACs are the dense op's (what the planner budgets against the dense layer)
# and the rebuild is reported apart, as ``reconstruction_macs``, which the oracle checks too.


def _entry(module, name, settings, **kwargs):
    from gkpd.plan.schema import LayerPlan

    return LayerPlan(
        name="layer", module_type=type(module).__name__, weight_shape=tuple(module.weight.shape),
        input_shape=(1,), dense_params=0, dense_macs=0, method=name, settings=settings, **kwargs,
    )


def _rebuild_macs(model):
    from gkpd.methods._tensorized import TensorizedLayer

    return sum(m.reconstruction_macs() for m in model.modules() if isinstance(m, TensorizedLayer))


def _kronecker(dense, order):
    if isinstance(dense, nn.Linear):
        layer = gkpd.KroneckerLinear.from_dense(dense, a_shape=(3, 4), rank=2)
    else:
        layer = gkpd.KroneckerConv2d.from_dense(dense, a_shape=(4, 2, 3, 1), rank=2)
    layer.path = order
    return layer


BUILDERS = {
    "gkpd b_first": lambda dense: _kronecker(dense, "b_first"),
    "gkpd a_first": lambda dense: _kronecker(dense, "a_first"),
    "gkpd auto": lambda dense: _kronecker(dense, "auto"),
    "gkpd weight": lambda dense: _kronecker(dense, "weight"),
    "svd": lambda dense: _build("svd", dense, {"rank": 3}),
    "tucker": lambda dense: _build("tucker", dense, {"ranks": [3, 4]}),
    "cp": lambda dense: _build("cp", dense, {"rank": 5}),
    "tensor_train": lambda dense: _build("tensor_train", dense, {"rank": 2}),
    "tensor_ring": lambda dense: _build("tensor_ring", dense, {"rank": 2}),
}
CONV_ONLY = {"tucker", "cp"}
DENSE = {
    "conv": (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 11, 9)),
    "linear": (lambda: nn.Linear(24, 18), (3, 5, 24)),
}


def _build(name, dense, settings):
    from gkpd.methods import get_method

    return get_method(name).build(dense, _entry(dense, name, settings), decompose=False)


class _Wrapped(nn.Module):
    """A compressed layer between a dense op and a ReLU, as in a model."""

    def __init__(self, layer, kind):
        super().__init__()
        self.pre = nn.Conv2d(8, 8, 1) if kind == "conv" else nn.Linear(24, 24)
        self.layer = layer

    def forward(self, x):
        return torch.relu(self.layer(self.pre(x)))


@pytest.mark.parametrize("kind", sorted(DENSE))
@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_count_model_counts_what_every_method_layer_runs(method, kind):
    if method in CONV_ONLY and kind == "linear":
        pytest.skip(f"{method} takes convolutions only")
    pytest.importorskip("tensorly")
    torch.manual_seed(0)
    make, shape = DENSE[kind]
    dense = make()
    layer = BUILDERS[method](dense)
    model = _Wrapped(layer, kind).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model.pre(x)
        model(x)  # the "weight" path caches its rebuilt weight at inference: warm it
    counts = count_model(model, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    measured = counter.get_total_flops() // 2
    assert counts.total_macs == measured - _rebuild_macs(model)
    assert counts["layer" if hasattr(layer, "macs") else "layer.0"]  # counted, not skipped
    assert counts["pre"].macs == module_macs(model.pre, x.shape)
    # a self-counting layer is one entry; its MACs are module_macs's and the layer's own
    if hasattr(layer, "macs"):
        assert [c.name for c in counts.layers] == ["pre", "layer"]
        assert counts["layer"].macs == module_macs(layer, expected.shape) == layer.macs(
            expected.shape
        )


@pytest.mark.parametrize("method", ["tensor_train", "tensor_ring"])
def test_tensorized_layer_macs_and_rebuild_cost(method):
    pytest.importorskip("tensorly")
    from gkpd.methods._tensorized import contract

    torch.manual_seed(0)
    for rank in (2, 3):
        for dense, x in (
            (nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.randn(2, 8, 11, 9)),
            (nn.Conv1d(8, 12, 5, padding="same", padding_mode="reflect"), torch.randn(8, 7)),
            (nn.Linear(24, 18), torch.randn(3, 5, 24)),
        ):
            layer = _build(method, dense, {"rank": rank}).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                contract(list(layer.cores))
            rebuild = counter.get_total_flops() // 2
            assert rebuild == layer.reconstruction_macs() > 0
            assert measured_macs(layer, x) == layer.macs(x.shape) + rebuild
            assert layer.macs(x.shape) == module_macs(dense, x.shape)
            assert count_model(layer, x).total_macs == layer.macs(x.shape)
    # at rank 1 the contraction is an outer product (a broadcast multiply, which
    # FlopCounterMode does not count); reconstruction_macs still counts its multiplies
    layer = _build(method, nn.Conv2d(8, 12, 3), {"rank": 1})
    assert layer.reconstruction_macs() > 0


class _Fused(nn.Module):
    """A module that gives its own MACs and runs a conv and a Kronecker layer inside."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.kron = gkpd.KroneckerConv2d(8, 8, 3, padding=1, a_shape=(2, 2, 3, 1), rank=1)

    def forward(self, x):
        return self.kron(self.conv(x))

    def macs(self, input_shape):
        return 1000 * input_shape[0]


def test_a_self_counting_module_covers_what_it_calls():
    torch.manual_seed(0)
    fused = _Fused()
    model = nn.Sequential(nn.Conv2d(3, 8, 1), fused, fused, nn.Flatten(), nn.Linear(512, 2))
    x = torch.randn(2, 3, 8, 8)
    counts = count_model(model, x)
    assert [c.name for c in counts.layers] == ["0", "1", "4"]
    assert counts["1"].calls == 2 and counts["1"].macs == 2 * 2000
    assert counts["1"].kind == "_Fused" and counts["1"].output_shape == (2, 8, 8, 8)
    assert counts.total_macs == 2 * 64 * 3 * 8 + 2 * 2000 + 2 * 512 * 2
    assert module_macs(fused, x.shape) == 2000
    # the layers inside are counted where they are called on their own
    alone = count_model(nn.Sequential(fused.conv, fused.kron), torch.randn(2, 8, 8, 8))
    assert [c.name for c in alone.layers] == ["0", "1"]
    # a ``macs`` that is not a method does not make a module count itself
    conv = nn.Conv2d(3, 4, 1)
    conv.macs = 5
    assert module_macs(conv, x.shape) == 2 * 64 * 3 * 4


class _TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, (3, 1), padding=(1, 0), padding_mode="reflect")
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(torch.relu(self.stem(x)))))
        x = self.conv3(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


@pytest.mark.parametrize(
    "method", ["gkpd", "svd", "tucker", "cp", "tensor_train", "tensor_ring", "prune"]
)
def test_count_model_of_every_compressed_model_is_what_runs(method):
    import copy

    from gkpd.apply import apply_

    pytest.importorskip("torch_pruning" if method == "prune" else "tensorly")
    torch.manual_seed(0)
    model = _TinyCNN().eval()
    x = torch.randn(1, 3, 12, 12)
    strategy = "uniform" if method == "prune" else "global"  # prune plans the whole model
    plan = gkpd.plan(model, x, ratio=2.0, method=method, strategy=strategy, min_params=500,
                     tolerance=0.1)
    assert plan.compressed_layers
    compressed = apply_(copy.deepcopy(model), plan).eval()
    with torch.no_grad():
        compressed(x)  # warm the "weight" path's cache, if any
    counts = count_model(compressed, x)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        compressed(x)
    assert counts.total_macs == counter.get_total_flops() // 2 - _rebuild_macs(compressed)
    assert counts.total_macs == plan.macs
    assert counts.total_params == plan.params


def test_count_model_of_a_model_called_with_keywords():
    from testkit.keyword_models import KeywordModel, token_batch

    torch.manual_seed(0)
    model, x = KeywordModel(output="dataclass"), token_batch(batch=3, length=5)
    counts = count_model(model, x)
    tokens = 3 * 5  # the feed-forward block runs on every token, the head once per sequence
    assert {c.name: c.macs for c in counts.layers} == {
        "up": linear_macs(64, 128, tokens), "down": linear_macs(128, 64, tokens),
        "head": linear_macs(64, 8, 3),
    }
    assert counts["up"].input_shape == (3, 5, 64)
    assert counts.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("module", "shape"), [
    (nn.LSTM(3, 8, 2, bidirectional=True, proj_size=4), (5, 2, 3)),
    (nn.GRU(3, 8, 2, batch_first=True), (2, 5, 3)),
    (nn.RNN(3, 8, nonlinearity="relu"), (5, 3)),  # unbatched
    (nn.LSTMCell(3, 8), (2, 3)),  # one step
    (nn.GRUCell(3, 8, bias=False), (3,)),  # one unbatched step
    (nn.RNNCell(3, 8), (4, 3)),
])
def test_recurrent_layers_count_their_products_as_torch_runs_them(module, shape):
    from gkpd.layers.attention import with_unpacked_layers

    x = torch.randn(shape)
    with torch.no_grad():
        assert recurrent_macs(module, shape) == measured_macs(module, x)
    model = nn.Sequential(module)
    dense, unpacked = count_model(model, x), count_model(with_unpacked_layers(model), x)
    assert dense["0"].macs == recurrent_macs(module, shape) == unpacked.total_macs
    assert dense.total_params == unpacked.total_params
