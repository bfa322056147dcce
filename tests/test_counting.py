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
    group_split,
    kronecker_conv_macs,
    kronecker_conv_order_macs,
    kronecker_params,
    linear_macs,
    module_macs,
    resolve_padding,
)
from gkpd.decompose import full_rank


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert resolve_padding("same", (4, 3), (1, 1), (1, 2)) == ((1, 2), (2, 2))


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
    assert macs == layer.order_macs(x.shape)
    for order in ("b_first", "a_first"):
        layer.order = order
        assert measured_macs(layer, x) == macs[order]
        assert layer.macs(x.shape) == macs[order]
    assert kronecker_conv_macs(
        (cfg["size"],) * 2, a, b, cfg["rank"], stride=cfg["stride"], padding=cfg["padding"],
        dilation=cfg["dilation"], groups=g, batch=2,
    ) == min(macs.values())


def test_linear_macs_match_flop_counter():
    layer = gkpd.KroneckerLinear(24, 20, bias=False, a_shape=(4, 3), rank=2)
    x = torch.randn(3, 5, 24)
    for order in ("b_first", "a_first"):
        layer.order = order
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
    assert counts["3"].order in ("a_first", "b_first")
    assert counts["3"].output_shape == (2, 32, 8, 8)
    assert counts["7"].macs == 2 * 100
    assert counts.total_macs == sum(layer.macs for layer in counts.layers)
    # every counted MAC is a MAC torch executes
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    assert counts.total_macs == counter.get_total_flops() // 2
