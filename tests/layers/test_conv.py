"""KroneckerConv1d/2d/3d: exactness against the dense convolution of the reconstructed
weight (the oracle) on every path, groups, strides, layouts; state, errors and caches.

Over 400 lines: one file per layer module (tests/ mirrors src/gkpd/); the cases share the
configuration strategy and the dense reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import divisors
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gkpd
from gkpd.counting import group_split
from gkpd.layers import KroneckerConvNd, base
from gkpd.layout import has_strides_of

f64 = torch.float64
DENSE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
KRON = {1: gkpd.KroneckerConv1d, 2: gkpd.KroneckerConv2d, 3: gkpd.KroneckerConv3d}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def conv_configs(draw):
    """A random dense conv (any groups incl. depthwise, padding mode, stride, dilation) and a
    compatible a_shape, plus an input."""
    nd = draw(st.sampled_from([1, 2, 3]))
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if kind == "depthwise":
        groups = draw(st.integers(1, 6))
        in_ch, out_ch = groups, groups * draw(st.sampled_from([1, 1, 2]))
    else:
        groups = 1 if kind == "plain" else draw(st.integers(2, 4))
        in_ch = groups * draw(st.integers(1, 4))
        out_ch = groups * draw(st.integers(1, 4))
    max_k = 3 if nd == 3 else 4
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(nd))
    k1 = tuple(draw(st.sampled_from(divisors(k))) for k in kernel)
    c1 = draw(st.sampled_from(divisors(in_ch // groups)))
    ok_f1 = []
    for f1 in divisors(out_ch):
        try:
            group_split(groups, (f1,), (out_ch // f1,))
            ok_f1.append(f1)
        except ValueError:
            pass
    f1 = draw(st.sampled_from(ok_f1))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "same":
        stride = (1,) * nd
        padding = "same"
    elif pad_kind == "valid":
        padding = "valid"
    elif pad_kind == "int":
        padding = draw(st.integers(0, 2))
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel, strict=True)]
    max_size = 7 if nd == 3 else 10
    size = tuple(
        max(e, 3) + draw(st.integers(0, max_size - max(e, 3))) if e <= max_size else e
        for e in extent
    )
    batch = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    return dict(
        nd=nd, in_ch=in_ch, out_ch=out_ch, kernel=kernel, stride=stride, padding=padding,
        dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
        a_shape=(f1, c1, *k1), input_shape=(batch, in_ch, *size),
    )


def make_dense(cfg, seed):
    torch.manual_seed(seed)
    return DENSE[cfg["nd"]](
        cfg["in_ch"], cfg["out_ch"], cfg["kernel"], cfg["stride"], cfg["padding"],
        cfg["dilation"], cfg["groups"], cfg["bias"], cfg["padding_mode"], dtype=f64,
    )


def rel(x, y):
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


@settings(deadline=None, max_examples=500)
@given(conv_configs(), st.integers(0, 2**31))
def test_full_rank_from_dense_is_exact(cfg, seed):
    dense = make_dense(cfg, seed)
    layer = KRON[cfg["nd"]].from_dense(dense, a_shape=cfg["a_shape"])
    x = torch.randn(cfg["input_shape"], dtype=f64)
    expected = dense(x)
    for order in ("auto", "b_first", "a_first", "weight"):
        layer.path = order
        out = layer(x)
        assert out.shape == expected.shape
        assert rel(out, expected) < 1e-10, order
    assert rel(layer.to_dense()(x), expected) < 1e-10


@settings(deadline=None, max_examples=250)
@given(conv_configs(), st.integers(0, 2**31), st.data())
def test_truncated_forward_and_gradients_match_reconstruction(cfg, seed, data):
    dense = make_dense(cfg, seed)
    a = cfg["a_shape"]
    b = tuple(w // x for w, x in zip(dense.weight.shape, a, strict=True))
    rank = data.draw(st.integers(1, min(math.prod(a), math.prod(b))))
    layer = KRON[cfg["nd"]].from_dense(dense, a_shape=a, rank=rank)
    reference = layer.to_dense()
    x = torch.randn(cfg["input_shape"], dtype=f64)
    expected = reference(x)
    x_ref = x.clone().requires_grad_()
    # oracle: the dense functional conv of the reconstructed weight, with autograd
    if cfg["padding_mode"] == "zeros":
        ref_out = CONV[cfg["nd"]](
            x_ref, layer.reconstruct_weight(), layer.bias, layer.stride, cfg["padding"],
            layer.dilation, layer.groups,
        )
    else:
        pads = [p for pair in reversed(layer._pads) for p in pair]
        ref_out = CONV[cfg["nd"]](
            F.pad(x_ref, pads, mode=cfg["padding_mode"]), layer.reconstruct_weight(),
            layer.bias, layer.stride, 0, layer.dilation, layer.groups,
        )
    torch.testing.assert_close(ref_out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(
        ref_out, [x_ref, layer.a, layer.b], grad_out
    )
    for order in ("b_first", "a_first", "weight"):
        layer.path = order
        x_k = x.clone().requires_grad_()
        out = layer(x_k)
        assert rel(out, expected) < 1e-10
        grads = torch.autograd.grad(out, [x_k, layer.a, layer.b], grad_out)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "nd, weight, a_shape",
    [
        (2, (8, 6, 3, 3), (4, 3, 3, 1)),  # 3x3 = 3x1 ⊗ 1x3
        (2, (8, 6, 4, 4), (2, 3, 2, 2)),  # 4x4 = 2x2 ⊗ 2x2
        (2, (4, 4, 9, 9), (2, 2, 3, 3)),  # 9x9 = 3x3 ⊗ 3x3
        (3, (4, 6, 3, 3, 3), (2, 3, 1, 3, 3)),  # 3x3x3 = 1x3x3 ⊗ 3x1x1
        (1, (6, 4, 6), (3, 2, 2)),
    ],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_named_kernel_splits(nd, weight, a_shape, stride):
    torch.manual_seed(0)
    dense = DENSE[nd](weight[1], weight[0], weight[2:], stride=stride, padding=1, dtype=f64)
    layer = KRON[nd].from_dense(dense, a_shape=a_shape)
    x = torch.randn(2, weight[1], *([11] * nd), dtype=f64)
    for order in ("b_first", "a_first"):
        layer.path = order
        assert rel(layer(x), dense(x)) < 1e-10


def test_depthwise_and_grouped_splits():
    torch.manual_seed(0)
    dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, dtype=f64)
    x = torch.randn(2, 16, 8, 8, dtype=f64)
    for a_shape in [(4, 1, 3, 1), (16, 1, 1, 3), (1, 1, 3, 3), (2, 1, 3, 3)]:
        layer = gkpd.KroneckerConv2d.from_dense(dw, a_shape=a_shape)
        assert rel(layer(x), dw(x)) < 1e-10
    grouped = nn.Conv2d(8, 16, 3, groups=4, dtype=f64)
    x = torch.randn(2, 8, 8, 8, dtype=f64)
    # g1 = 4 (groups divide F1), and g1 = F1 = 2, g2 = 2 with C1 = 2 (input permute path)
    for a_shape, split in [((4, 1, 3, 3), (4, 1)), ((8, 2, 1, 3), (4, 1)), ((2, 2, 3, 1), (2, 2))]:
        layer = gkpd.KroneckerConv2d.from_dense(grouped, a_shape=a_shape)
        assert (layer._g1, layer._g2) == split
        for order in ("b_first", "a_first"):
            layer.path = order
            assert rel(layer(x), grouped(x)) < 1e-10


def test_incompatible_groups_raise():
    with pytest.raises(ValueError, match=r"a_shape \(2, 1, 3, 3\) is incompatible with groups=3"):
        gkpd.KroneckerConv2d(6, 12, 3, groups=3, a_shape=(2, 1, 3, 3), rank=1)


def test_stride_moves_into_first_stage():
    layer = gkpd.KroneckerConv2d(16, 16, 3, stride=2, padding=1, a_shape=(4, 4, 1, 1), rank=2)
    x = torch.randn(1, 16, 16, 16)
    macs = layer.order_macs(x.shape)
    # b_first: A is 1x1 so B runs with stride 2; both stages at 8x8 output
    assert macs["b_first"] == 2 * (4 * 4 * 4 * 9 * 64) + 2 * (4 * 4 * 4 * 64)
    layer.path = "b_first"
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-5)


def test_auto_order_picks_cheaper():
    layer = gkpd.KroneckerConv2d(64, 64, 3, padding=1, a_shape=(8, 8, 3, 3), rank=4)
    shape = (1, 64, 16, 16)
    macs = layer.order_macs(shape)
    assert layer.resolve_path(shape) == min(macs, key=macs.get)
    assert layer.macs(shape) == min(macs.values())
    layer.path = "a_first"
    assert layer.macs(shape) == macs["a_first"]
    with pytest.raises(ValueError, match="path 'fast'"):
        layer.path = "fast"


def test_a_forced_order_refuses_a_tensor_between_stages_larger_than_memory(monkeypatch):
    # (1, C, 1, 1) run b_first folds all 16 input channels into the batch: 2·16 rows of
    # rank·F2 = 2·16 channels of 8×8, 65536 floats between the stages
    layer = gkpd.KroneckerConv2d(16, 16, 3, padding=1, a_shape=(1, 16, 1, 1), rank=2)
    x = torch.randn(2, 16, 8, 8)
    monkeypatch.setattr(base, "memory_bytes", lambda device: 4 * 65536 - 1)
    layer.path = "b_first"
    refused = r"path='b_first'.*262,144 bytes.*shape \(2, 16, 8, 8\).*262,143 bytes"
    with pytest.raises(MemoryError, match=refused):
        layer(x)
    monkeypatch.setattr(base, "memory_bytes", lambda device: 4 * 65536)
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(base, "memory_bytes", lambda device: 1)
    layer(x)  # checked once per input shape: this one fitted already
    with pytest.raises(MemoryError, match=r"shape \(4, 16, 8, 8\)"):
        layer(torch.randn(4, 16, 8, 8))  # a new shape is checked again
    layer.path = "auto"  # auto is never refused: its fewer MACs bound what it builds
    torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-5)


class _ConvDilations(TorchDispatchMode):
    """The (kernel, dilation) of every convolution that runs."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append((tuple(args[1].shape[2:]), tuple(args[5])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["b_first", "a_first", "b_first_channels", "a_first_channels"])
@pytest.mark.parametrize("a_shape", [(1, 16, 3, 1), (1, 16, 1, 3), (2, 16, 1, 1)])
def test_no_stage_dilates_along_a_kernel_axis_of_size_one(path, a_shape):
    # A (1, 16, 3, 1) ⊗ B (16, 1, 1, 3): A's stage is dilated by B's kernel (1, 3), which along
    # A's size-1 axis changes nothing but sends torch to its slow dilated convolution
    dense = nn.Conv2d(16, 16, 3, padding=1)
    layer = gkpd.KroneckerConv2d.from_dense(dense, a_shape=a_shape, rank=2)
    if path not in ("b_first", "a_first") and path not in layer.channel_paths():
        pytest.skip(f"{a_shape} has no {path}")
    layer.path = path
    x = torch.randn(1, 16, 8, 8)
    with _ConvDilations() as convs:
        y = layer(x)
    torch.testing.assert_close(y, F.conv2d(x, layer.reconstruct_weight(), layer.bias,
                                           padding=1), rtol=1e-4, atol=1e-5)
    for kernel, dilation in convs.seen:
        assert all(d == 1 for k, d in zip(kernel, dilation, strict=True) if k == 1), convs.seen


def test_init_variance_matches_dense_default():
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(64, 64, 3, a_shape=(8, 8, 3, 1), rank=8)
    var = torch.stack([
        (layer.reset_parameters(), layer.reconstruct_weight().var())[1] for _ in range(20)
    ]).mean().item()
    expected = 1.0 / (3 * 64 * 9)
    assert var == pytest.approx(expected, rel=0.1)
    dense_var = nn.Conv2d(64, 64, 3).weight.var().item()
    assert dense_var == pytest.approx(expected, rel=0.1)
    dw = gkpd.KroneckerConv2d(32, 32, 3, groups=32, a_shape=(4, 1, 3, 3), rank=1)
    assert dw.reconstruct_weight().var().item() == pytest.approx(1 / (3 * 9), rel=0.5)


def test_state_dict_round_trip_and_repr():
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(8, 16, 3, padding="same", a_shape=(4, 2, 3, 1), rank=3)
    assert set(layer.state_dict()) == {"a", "b", "bias"}
    other = gkpd.KroneckerConv2d(8, 16, 3, padding="same", a_shape=(4, 2, 3, 1), rank=3)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 7, 7)
    torch.testing.assert_close(other(x), layer(x))
    text = repr(layer)
    assert "a_shape=(4, 2, 3, 1)" in text and "b_shape=(4, 4, 1, 3)" in text and "rank=3" in text
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.padding == "same"


def test_no_grad_jit_trace_and_unbatched():
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv1d(6, 8, 3, stride=2, padding=1, a_shape=(2, 3, 3), rank=2)
    x = torch.randn(3, 6, 20)
    with torch.no_grad():
        out = layer(x)
    assert not out.requires_grad
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), out)
    torch.testing.assert_close(layer(x[0]), out[0])


def test_from_dense_preserves_device_dtype_and_is_base_class_generic():
    conv = nn.Conv3d(4, 4, 3, dtype=torch.float64)
    layer = KroneckerConvNd.from_dense(conv, a_shape=(2, 2, 1, 3, 3), rank=2)
    assert isinstance(layer, gkpd.KroneckerConv3d)
    assert layer.a.dtype == torch.float64 and layer.rank == 2
    with pytest.raises(TypeError, match="nn.Conv2d"):
        gkpd.KroneckerConv2d.from_dense(conv, a_shape=(2, 2, 1, 3, 3))
    with pytest.raises(TypeError, match="nn.Conv"):
        gkpd.KroneckerConv2d.from_dense(nn.Linear(4, 4), a_shape=(2, 2, 1, 1))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"a_shape \(3, 2, 3, 3\) does not divide weight shape "
                                         r"\(64, 64, 3, 3\) on mode 0"):
        gkpd.KroneckerConv2d(64, 64, 3, a_shape=(3, 2, 3, 3), rank=1)
    with pytest.raises(ValueError, match="modes"):
        gkpd.KroneckerConv2d(64, 64, 3, a_shape=(4, 4, 3), rank=1)
    with pytest.raises(ValueError, match="rank 0"):
        gkpd.KroneckerConv2d(64, 64, 3, a_shape=(4, 4, 3, 3), rank=0)
    with pytest.raises(ValueError, match="rank 145"):
        gkpd.KroneckerConv2d(64, 64, 3, a_shape=(4, 4, 3, 3), rank=145)
    with pytest.raises(ValueError, match="in_channels 6 is not divisible by groups 4"):
        gkpd.KroneckerConv2d(6, 8, 3, groups=4, a_shape=(4, 1, 3, 3), rank=1)
    with pytest.raises(ValueError, match="out_channels 6 is not divisible by groups 4"):
        gkpd.KroneckerConv2d(8, 6, 3, groups=4, a_shape=(2, 1, 3, 3), rank=1)
    with pytest.raises(ValueError, match="padding_mode 'mirror'"):
        gkpd.KroneckerConv2d(8, 8, 3, padding_mode="mirror", a_shape=(2, 2, 3, 3), rank=1)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        gkpd.KroneckerConv2d(8, 8, 3, stride=2, padding="same", a_shape=(2, 2, 3, 3), rank=1)
    with pytest.raises(TypeError, match="floating dtype"):
        gkpd.KroneckerConv2d(8, 8, 3, a_shape=(2, 2, 3, 3), rank=1, dtype=torch.int32)
    int_conv = nn.Conv2d(4, 4, 3)
    del int_conv.weight
    int_conv.weight = torch.ones(4, 4, 3, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating dtype"):
        gkpd.KroneckerConv2d.from_dense(int_conv, a_shape=(2, 2, 3, 3))
    layer = gkpd.KroneckerConv2d(8, 8, 3, a_shape=(2, 2, 3, 3), rank=1)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(1, 4, 8, 8))


def test_weight_path_cache_follows_factor_updates():
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(8, 8, 3, padding=1, a_shape=(2, 2, 3, 1), rank=2, dtype=f64)
    layer.path = "weight"
    layer.eval()
    x = torch.randn(2, 8, 6, 6, dtype=f64)
    with torch.no_grad():
        first = layer(x)
        assert layer._weight_cache is not None
        cached = layer._weight_cache["weight"][1]
        assert layer(x).equal(first) and layer._weight_cache["weight"][1] is cached
        layer.a.mul_(2.0)  # an optimizer step or load_state_dict changes the factors in place
        torch.testing.assert_close(layer(x) - layer.bias.view(1, -1, 1, 1),
                                   2 * (first - layer.bias.view(1, -1, 1, 1)))
        layer.load_state_dict({k: torch.zeros_like(v) for k, v in layer.state_dict().items()})
        assert layer(x).abs().max().item() == 0.0
    layer.train()
    layer(x)
    assert layer._weight_cache is None  # training never reuses a stale weight
    assert layer.macs(x.shape) == 2 * 8 * 8 * 9 * 36


def _spy_on_recording(layer):
    """Count the layer's recorded (not replayed) forwards."""
    calls = []
    run = layer._run
    layer._run = lambda x, step: calls.append(1) or run(x, step)
    return calls


@settings(deadline=None, max_examples=150)
@given(conv_configs(), st.integers(0, 2**31), st.data())
def test_a_replayed_forward_equals_the_recorded_one_on_every_path(cfg, seed, data):
    """At inference the second call of an input signature replays the first's steps; every
    path, padding, groups, layout and unbatched input must give what the dense op of the
    reconstructed weight gives (the oracle) on both calls, and in the input's layout."""
    dense = make_dense(cfg, seed)
    a = cfg["a_shape"]
    b = tuple(w // x for w, x in zip(dense.weight.shape, a, strict=True))
    rank = data.draw(st.integers(1, min(math.prod(a), math.prod(b))))
    layer = KRON[cfg["nd"]].from_dense(dense, a_shape=a, rank=rank).eval()
    x = torch.randn(cfg["input_shape"], dtype=f64)
    if cfg["nd"] > 1 and data.draw(st.booleans()):
        x = x.to(memory_format={2: torch.channels_last, 3: torch.channels_last_3d}[cfg["nd"]])
    unbatched = x.shape[0] == 1 and data.draw(st.booleans())
    if unbatched:
        x = x[0]
    recorded = _spy_on_recording(layer)
    expected = layer.to_dense()(x)
    for path in ("auto", "b_first", "a_first", "weight", *layer.channel_paths()):
        layer.path = path
        with torch.no_grad():
            first, second = layer(x), layer(x)
        assert len(recorded) == 1, path  # the second call replayed
        recorded.clear()
        assert rel(first, expected) < 1e-10 and second.equal(first), path
        assert second.stride() == first.stride()


@pytest.mark.parametrize("nd, a_shape", [(1, (4, 4, 1)), (2, (16, 1, 3, 3)), (2, (2, 1, 3, 1))])
def test_an_empty_batch_gives_an_empty_output_on_every_path(nd, a_shape):
    """As the dense conv does; the stages' reshapes could not infer sizes from 0 elements."""
    torch.manual_seed(0)
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[nd]
    dense = conv(8 if nd == 1 else 32, 16 if nd == 1 else 32, 3, padding=1)
    layer = KRON[nd].from_dense(dense, a_shape=a_shape, rank=2)
    x = torch.randn(0, dense.in_channels, *([6] * nd))
    for path in ("auto", "b_first", "a_first", "weight", *layer.channel_paths()):
        layer.path = path
        for training in (True, False):
            layer.train(training)
            assert layer(x).shape == dense(x).shape, path


def test_a_replay_is_not_used_once_what_it_recorded_changed():
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(8, 8, 3, padding=1, a_shape=(2, 1, 3, 1), rank=2,
                                 dtype=f64).eval()
    recorded = _spy_on_recording(layer)
    x = torch.randn(2, 8, 6, 6, dtype=f64)

    def check(reason, records=1):
        with torch.no_grad():
            out = layer(x)
        assert len(recorded) == records, reason
        recorded.clear()
        torch.testing.assert_close(out, layer.to_dense()(x), msg=reason)

    check("first call")
    check("same input", records=0)
    with torch.no_grad():
        layer.a.mul_(2.0)  # an optimizer step or load_state_dict: in place
    check("factor changed in place")
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    check("state dict loaded")
    layer.bias = nn.Parameter(torch.randn(8, dtype=f64))
    check("bias replaced")
    layer.bias.data = torch.randn(8, dtype=f64)  # the same Parameter, new storage
    check("bias data assigned")
    with torch.no_grad():  # an EMA through state_dict (timm, AveragedModel): detached views
        for value in layer.state_dict().values():
            value.mul_(0.5)
    check("changed through detached views")
    layer.a.data.mul_(2.0)  # .data bypasses the version counter: unseen until cleared
    gkpd.clear_caches(nn.Sequential(layer))
    check("cleared after a change through .data")
    layer.path = "b_first"
    check("path changed")
    layer.path = "auto"
    check("back to auto", records=0)
    x = torch.randn(3, 8, 6, 6, dtype=f64)
    check("new batch size")
    x = x.to(memory_format=torch.channels_last)
    check("new layout")
    layer.double()  # no change: the same tensors
    check("same dtype", records=0)
    layer.float()
    x = x.float()
    check("new dtype")
    layer.train()
    layer(x)
    assert not layer._replays  # training keeps none, and drops what inference kept
    layer.eval()
    with torch.no_grad():
        for size in range(4, 30):  # a model fed ever new sizes keeps a bounded number
            layer(torch.randn(1, 8, size, size))
    assert 0 < len(layer._replays) <= base._MAX_REPLAYS


@pytest.mark.parametrize("path", ["weight", "b_first", "b_first_channels"])
def test_an_ensemble_vmapped_over_stacked_factors_at_inference(path):
    """torch.func's model ensembling swaps in batched factors (no storage): nothing derived
    from them may be kept or looked up by their data pointers."""
    import copy

    torch.manual_seed(0)
    models = [gkpd.KroneckerConv2d(4, 4, 3, padding=1, a_shape=(2, 1, 3, 1), rank=2).eval()
              for _ in range(3)]
    for m in models:
        m.path = path
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0])
    x = torch.randn(2, 4, 5, 5)

    def run(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    with torch.no_grad():
        expected = torch.stack([m(x) for m in models])
        for _ in range(2):  # and again, where a kept forward would be replayed
            got = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(base(x), expected[0])  # its own factors again


@pytest.mark.parametrize("path", ["weight", "b_first", "b_first_channels"])
def test_a_call_under_autocast_leaves_nothing_in_its_precision(path):
    """A weight reconstructed under autocast is bfloat16: kept, it made the next call outside
    autocast fail on the dtype."""
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(4, 4, 3, padding=1, a_shape=(2, 1, 3, 1), rank=2).eval()
    layer.path = path
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = layer.to_dense()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x)  # the first call: nothing kept from before
        again = layer(x)
    assert low.dtype == torch.bfloat16 and again.dtype == torch.float32
    torch.testing.assert_close(again, expected)
    torch.testing.assert_close(low.float(), expected, rtol=0.05, atol=0.05)


def test_replays_are_not_pickled_or_shared_by_copies():
    import copy
    import pickle

    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(4, 4, 3, padding=1, a_shape=(2, 1, 3, 1), rank=1).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        layer(x)
        assert layer._replays
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone._replays == {}
            clone.a.mul_(3.0)
            torch.testing.assert_close(clone(x), clone.to_dense()(x))
            torch.testing.assert_close(layer(x), layer.to_dense()(x))


@pytest.mark.parametrize("path", ["auto", "b_first", "a_first", "weight"])
def test_a_layer_trained_in_place_deep_copies_on_every_path(path):
    """A weight cached under no_grad may be a view of the factors; once an optimizer step
    changed them in place, copy.deepcopy refused to copy it (on the paths that never read
    the cache again to rebuild it)."""
    import copy

    torch.manual_seed(0)
    # F1 == 1: the channel path's first stage weight is a view of a
    layer = gkpd.KroneckerConv2d(4, 4, 3, padding=1, a_shape=(1, 4, 1, 3), rank=2).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        layer(x)  # on auto: the channel path's stage weights are cached
        layer.path = path
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).square().sum().backward()
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
        clone = copy.deepcopy(layer)
        torch.testing.assert_close(clone(x), expected)
        torch.testing.assert_close(clone(x), clone.to_dense()(x))


def test_weight_path_reads_parametrized_factors():
    """A parametrization moves a factor out of the parameter dict the cache reads, and
    computes it anew on each read: the layer must run with what ``layer.a`` gives now."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, a):
            return 2 * a

    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(8, 8, 3, padding=1, a_shape=(2, 2, 3, 1), rank=2, dtype=f64,
                                 bias=False).eval()
    layer.path = "weight"
    x = torch.randn(2, 8, 6, 6, dtype=f64)
    with torch.no_grad():
        plain = layer(x)
        parametrize.register_parametrization(layer, "a", Doubled())
        torch.testing.assert_close(layer(x), 2 * plain)
        layer.parametrizations.a.original.mul_(3.0)  # in place: the parametrized a is new
        torch.testing.assert_close(layer(x), 6 * plain)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_derived_weights_are_cached_contiguous_in_the_input_layout(layout):
    """A weight that is not contiguous in the input's layout is copied by the convolution on
    every call: the cached weights of the weight path and of a channel path must be."""
    torch.manual_seed(0)
    dense = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(2, 8, 6, 6).to(memory_format=layout)
    for path in ("weight", "a_first_channels"):
        layer = gkpd.KroneckerConv2d.from_dense(dense, a_shape=(1, 8, 3, 1))  # exact
        layer.path = path
        layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-5)
            cached = [w for _, value in layer._weight_cache.values() for w in _tensors(value)]
        assert cached and all(w.is_contiguous(memory_format=layout) for w in cached if w.dim() == 4)


def test_a_one_channel_input_keeps_its_own_layout_on_every_path():
    """A one-channel tensor is contiguous in both layouts; its strides say which it is, and
    the cached weights must follow them: channels_last weights beside this NCHW float32
    input made torch's convolution return values of 1e30 (the dense conv is right)."""
    torch.manual_seed(0)
    dense = nn.Conv2d(1, 3, (1, 3), stride=(1, 3), bias=False)
    layer = gkpd.KroneckerConv2d.from_dense(dense, a_shape=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 1, 13, 4)
    as_channels_last = gkpd.layout.in_memory_format(torch.randn(2, 1, 6, 6), torch.channels_last)
    with torch.no_grad():
        for path in ("auto", "a_first", "b_first", "weight", *layer.channel_paths()):
            layer.path = path
            for _ in range(2):  # recorded, then replayed
                torch.testing.assert_close(layer(x), dense(x), rtol=1e-4, atol=1e-5)
        layer.path = "weight"
        layer(as_channels_last)  # converted by the library: its weights in channels_last
        layouts = {key: has_strides_of(w, torch.channels_last)
                   for key, (_, w) in layer._weight_cache.items() if key.startswith("weight")}
    assert layouts == {"weight": False, "weight channels_last": True}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)] if isinstance(value, tuple) else []


CHANNEL_CASES = [  # (in, out, kernel, stride, padding, dilation, padding_mode, a_shape, rank)
    (16, 16, 3, 1, 1, 1, "zeros", (2, 1, 3, 1), 2),  # C1 == 1: a channel shuffle at the end
    (16, 16, 3, 1, 2, 2, "zeros", (4, 1, 3, 3), 2),
    (8, 12, 3, 2, 1, 1, "reflect", (3, 1, 3, 3), 2),
    (16, 16, 3, 1, 1, 1, "zeros", (16, 2, 3, 1), 3),  # F2 == 1
    (8, 12, 3, 2, 1, 1, "circular", (12, 2, 1, 3), 2),
    (16, 16, 3, 1, 1, 1, "zeros", (8, 16, 3, 1), 2),  # C2 == 1: a_first_channels
    (8, 12, 3, 2, 1, 1, "replicate", (4, 8, 3, 1), 2),
    (1, 8, 1, 1, 0, 1, "zeros", (1, 1, 1, 1), 1),  # both paths
    # one input channel per group of the grouped stage: run as a depthwise conv
    (16, 16, 3, 1, 1, 1, "zeros", (2, 1, 3, 1), 1),  # C1 == 1, R == 1: no channel shuffle
    (8, 12, 3, 2, 1, 1, "zeros", (3, 1, 3, 3), 1),
    (16, 16, 3, 1, 1, 1, "zeros", (8, 16, 3, 1), 1),  # C2 == 1, R == 1: B's F2 per channel
    (8, 8, 3, 1, 1, 1, "zeros", (8, 8, 3, 1), 3),  # F2 == 1, C2 == 1: B's R per channel
]


@pytest.mark.parametrize("case", CHANNEL_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_paths_match_the_dense_layer(case, channels_last):
    cin, cout, k, s, p, d, mode, a_shape, rank = case
    torch.manual_seed(0)
    layer = gkpd.KroneckerConv2d(cin, cout, k, s, p, d, padding_mode=mode, a_shape=a_shape,
                                 rank=rank, dtype=f64)
    x = torch.randn(3, cin, 9, 10, dtype=f64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dense = layer.to_dense()
    expected = dense(x)
    paths = layer.channel_paths()
    assert paths, "every case has a channel path"
    for path in paths:
        layer.path = path
        layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected)
            torch.testing.assert_close(layer(x), expected)  # from the cached weights
        if channels_last and mode == "zeros":  # the input's layout stays (F.pad of the other
            # padding modes returns NCHW)
            assert layer(x).is_contiguous(memory_format=torch.channels_last)
        if not channels_last:
            assert layer(x).is_contiguous()
        layer.train()
        x_grad = x.detach().requires_grad_()
        layer(x_grad).square().sum().backward()
        a_grad = layer.a.grad.clone()
        layer.a.grad = None
        # the gradient reaching the factors is that of the dense op through the weight
        layer.path = "weight"
        layer(x).square().sum().backward()
        torch.testing.assert_close(a_grad, layer.a.grad)
        layer.a.grad = None
        assert layer.macs(x.shape) == layer.dense_macs(x.shape)
        layer.path = path
        base = path.removesuffix("_channels")
        assert layer.macs(x.shape) == layer.order_macs(x.shape)[base]


@pytest.mark.parametrize("nd, a_shape, b_path", [(1, (2, 1, 3), True), (3, (2, 1, 3, 1, 3), True),
                                                 (3, (4, 8, 1, 3, 1), False)])
def test_channel_paths_in_1d_and_3d(nd, a_shape, b_path):
    torch.manual_seed(0)
    layer = KRON[nd](8, 8, 3, 1, 1, a_shape=a_shape, rank=2, dtype=f64).eval()
    x = torch.randn(2, 8, *([5] * nd), dtype=f64)
    layer.path = "b_first_channels" if b_path else "a_first_channels"
    torch.testing.assert_close(layer(x), layer.to_dense()(x))


@pytest.mark.parametrize("case", CHANNEL_CASES)
def test_auto_runs_the_cheaper_order_on_its_channel_path(case):
    cin, cout, k, s, p, d, mode, a_shape, rank = case
    layer = gkpd.KroneckerConv2d(cin, cout, k, s, p, d, padding_mode=mode, a_shape=a_shape,
                                 rank=rank, dtype=f64)
    x = torch.randn(2, cin, 9, 10, dtype=f64)
    macs = layer.order_macs(x.shape)
    cheaper = min(("b_first", "a_first"), key=lambda o: (macs[o], o != "b_first"))
    channel = f"{cheaper}_channels"
    expected = channel if channel in layer.channel_paths() else cheaper
    assert layer.path == "auto" and layer.resolve_path(x.shape) == expected
    assert layer.macs(x.shape) == macs[cheaper]
    torch.testing.assert_close(layer(x), layer.to_dense()(x))
    # no channel path for the cheaper order: the stage order itself
    stage_only = gkpd.KroneckerConv2d(8, 8, 3, padding=1, a_shape=(2, 2, 3, 3), rank=1)
    assert stage_only.resolve_path((1, 8, 6, 6)) in ("b_first", "a_first")


def test_channel_path_needs_matching_shapes():
    layer = gkpd.KroneckerConv2d(8, 8, 3, a_shape=(2, 2, 3, 3), rank=1)
    assert layer.channel_paths() == ()
    with pytest.raises(ValueError, match="b_first_channels.*a_shape"):
        layer.path = "b_first_channels"
    grouped = gkpd.KroneckerConv2d(8, 8, 3, groups=2, a_shape=(2, 1, 3, 3), rank=1)
    assert grouped.channel_paths() == ()
    assert layer.path == "auto"  # a refused order changes nothing


@pytest.mark.parametrize("nd, layout", [(1, torch.channels_last), (1, torch.channels_last_3d),
                                        (2, torch.channels_last), (3, torch.channels_last_3d)])
def test_model_to_channels_last_converts_the_factors(nd, layout):
    # Module.to(memory_format=...) refuses tensors of a rank other than the format's; the
    # factors carry a leading rank dim, so a plain conversion would fail on them
    torch.manual_seed(0)
    a_shape = (2, 1, *([3] + [1] * (nd - 1)))
    model = nn.Sequential(KRON[nd](8, 8, 3, padding=1, a_shape=a_shape, rank=2, dtype=f64))
    x = torch.randn(2, 8, *([5] * nd), dtype=f64)
    expected = model(x)
    model[0].a.grad = torch.ones_like(model[0].a)
    a, b = model[0].a.detach().clone(), model[0].b.detach().clone()
    model.to(memory_format=layout)
    assert model[0].a.equal(a) and model[0].b.equal(b)
    assert model[0].a.grad.equal(torch.ones_like(a))
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(RuntimeError, match="channels_last"):  # other tensors still refuse
        nn.Sequential(nn.Conv2d(2, 2, 1)).to(memory_format=torch.channels_last_3d)
