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
from gkpd.layers import base, linear

f64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def linear_configs(draw):
    in_f = draw(st.integers(1, 24))
    out_f = draw(st.integers(1, 24))
    a_shape = (draw(st.sampled_from(divisors(out_f))), draw(st.sampled_from(divisors(in_f))))
    lead = tuple(draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 3))))
    return in_f, out_f, a_shape, lead, draw(st.booleans())


def rel(x, y):
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


@settings(deadline=None, max_examples=200)
@given(linear_configs(), st.integers(0, 2**31), st.data())
def test_linear_exact_and_truncated(cfg, seed, data):
    in_f, out_f, a_shape, lead, bias = cfg
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias, dtype=f64)
    x = torch.randn(*lead, in_f, dtype=f64)
    layer = gkpd.KroneckerLinear.from_dense(dense, a_shape=a_shape)
    for order in ("auto", "b_first", "a_first", "weight"):
        layer.path = order
        out = layer(x)
        assert out.shape == (*lead, out_f)
        assert rel(out, dense(x)) < 1e-10
    b_shape = layer.b_shape
    rank = data.draw(st.integers(1, min(math.prod(a_shape), math.prod(b_shape))))
    layer = gkpd.KroneckerLinear.from_dense(dense, a_shape=a_shape, rank=rank)
    x_ref = x.clone().requires_grad_()
    ref = F.linear(x_ref, layer.reconstruct_weight(), layer.bias)
    torch.testing.assert_close(ref, layer.to_dense()(x), rtol=1e-10, atol=1e-12)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, [x_ref, layer.a, layer.b], grad_out)
    for order in ("b_first", "a_first", "weight"):
        layer.path = order
        x_k = x.clone().requires_grad_()
        out = layer(x_k)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        grads = torch.autograd.grad(out, [x_k, layer.a, layer.b], grad_out)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@settings(deadline=None, max_examples=100)
@given(linear_configs(), st.integers(0, 2**31), st.data())
def test_linear_replayed_forward_equals_the_recorded_one(cfg, seed, data):
    """At inference the second call of an input signature replays the first's steps (the
    factors' reshapes done once): both must give the dense op of the reconstructed weight."""
    in_f, out_f, a_shape, lead, bias = cfg
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias, dtype=f64)
    b_shape = (out_f // a_shape[0], in_f // a_shape[1])
    rank = data.draw(st.integers(1, min(math.prod(a_shape), math.prod(b_shape))))
    layer = gkpd.KroneckerLinear.from_dense(dense, a_shape=a_shape, rank=rank).eval()
    x = torch.randn(*lead, in_f, dtype=f64)
    recorded = []
    run = layer._run
    layer._run = lambda x, step: recorded.append(1) or run(x, step)
    expected = layer.to_dense()(x)
    for path in ("auto", "b_first", "a_first", "weight"):
        layer.path = path
        with torch.no_grad():
            first, second = layer(x), layer(x)
            layer.a.mul_(2.0)  # a change of the factors is not replayed over
            doubled = layer(x)
            layer.a.mul_(0.5)
        assert recorded == [1, 1], path
        recorded.clear()
        torch.testing.assert_close(first, expected, rtol=1e-10, atol=1e-12)
        assert second.equal(first)
        plain = expected - layer.bias if bias else expected
        torch.testing.assert_close(doubled, expected + plain, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", ["auto", "weight", "a_first", "b_first"])
def test_linear_on_an_empty_batch(path):
    layer = gkpd.KroneckerLinear(8, 6, a_shape=(2, 4), rank=2)
    layer.path = path
    assert layer(torch.randn(0, 3, 8)).shape == (0, 3, 6)


@pytest.mark.parametrize("path", ["weight", "a_first", "b_first"])
def test_linear_replay_sees_a_new_bias_storage_and_a_cleared_cache(path):
    torch.manual_seed(0)
    layer = gkpd.KroneckerLinear(8, 6, a_shape=(2, 4), rank=2, dtype=f64).eval()
    layer.path = path
    x = torch.randn(5, 8, dtype=f64)
    with torch.no_grad():
        layer(x)
        layer.bias.data = torch.randn(6, dtype=f64)  # the same Parameter, new storage
        torch.testing.assert_close(layer(x), layer.to_dense()(x))
        layer.a.data.mul_(3.0)  # unseen by the version counter ...
        layer.clear_cache()  # ... until the caches are dropped
        torch.testing.assert_close(layer(x), layer.to_dense()(x))


@pytest.mark.parametrize("path", ["weight", "a_first", "b_first"])
def test_linear_ensemble_vmapped_over_stacked_factors_at_inference(path):
    import copy

    torch.manual_seed(0)
    models = [gkpd.KroneckerLinear(8, 6, a_shape=(2, 4), rank=2).eval() for _ in range(3)]
    for m in models:
        m.path = path
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0])
    x = torch.randn(5, 8)

    def run(p, b, x):
        return torch.func.functional_call(base, (p, b), (x,))

    with torch.no_grad():
        expected = torch.stack([m(x) for m in models])
        for _ in range(2):
            got = torch.func.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
            torch.testing.assert_close(got, expected)
        torch.testing.assert_close(base(x), expected[0])


def test_linear_init_variance_state_dict_trace_repr():
    torch.manual_seed(0)
    layer = gkpd.KroneckerLinear(256, 128, a_shape=(16, 16), rank=4)
    var = torch.stack([
        (layer.reset_parameters(), layer.reconstruct_weight().var())[1] for _ in range(10)
    ]).mean().item()
    assert var == pytest.approx(1 / (3 * 256), rel=0.1)
    other = gkpd.KroneckerLinear(256, 128, a_shape=(16, 16), rank=4)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(5, 256)
    torch.testing.assert_close(other(x), layer(x))
    traced = torch.jit.trace(layer, x)
    torch.testing.assert_close(traced(x), layer(x))
    with torch.no_grad():
        assert not layer(x).requires_grad
    assert "a_shape=(16, 16), b_shape=(8, 16), rank=4" in repr(layer)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)


def test_linear_macs_and_order():
    layer = gkpd.KroneckerLinear(64, 32, a_shape=(2, 32), rank=2)
    macs = layer.order_macs((10, 64))
    assert layer.macs((10, 64)) == min(macs.values())
    assert macs["b_first"] == 10 * 2 * (32 * 2 * 16 + 2 * 32 * 16)


def test_linear_forced_order_refuses_a_tensor_between_stages_larger_than_memory(
    monkeypatch,
):
    layer = gkpd.KroneckerLinear(12, 20, a_shape=(4, 3), rank=2)  # B: (5, 4)
    x = torch.randn(3, 7, 12)  # 21 rows; b_first: 21·I1·R·O2 = 630, a_first: 21·O1·R·I2 = 672
    monkeypatch.setattr(base, "memory_bytes", lambda device: 4 * 672 - 1)
    layer.path = "b_first"
    layer(x)
    layer.path = "a_first"
    with pytest.raises(MemoryError, match="path='a_first'"):
        layer(x)


@pytest.mark.parametrize("columns", [1, 3])
def test_left_matmul_is_the_matrix_product(columns):
    w = torch.randn(6, 5, dtype=f64)
    x = torch.randn(4, columns, 5, dtype=f64).mT  # a transposed batch, as the stages pass
    torch.testing.assert_close(linear._left_matmul(w, x), w @ x)


@pytest.mark.parametrize("a_shape", [(2, 12), (1, 12)])
def test_a_one_column_stage_runs_as_one_matrix_product(a_shape):
    # A (2, 12) ⊗ B (8, 1): each token's A stage is one column; torch's matmul ran them as a
    # batched matrix-vector product, 10x slower than one matrix product at MiniLM's sizes
    layer = gkpd.KroneckerLinear(12, 8 * a_shape[0], a_shape=a_shape, rank=3)
    x = torch.randn(5, 7, 12)
    with torch.no_grad(), _Ops() as ops:  # at inference, where torch does not fold it
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.reconstruct_weight(), layer.bias))
    assert torch.ops.aten.bmm.default not in ops.seen, ops.seen


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_linear_bad_inputs():
    with pytest.raises(ValueError, match=r"a_shape \(3, 4\) does not divide weight shape "
                                         r"\(32, 64\) on mode 0"):
        gkpd.KroneckerLinear(64, 32, a_shape=(3, 4), rank=1)
    with pytest.raises(ValueError, match="modes"):
        gkpd.KroneckerLinear(64, 32, a_shape=(4, 4, 1), rank=1)
    with pytest.raises(ValueError, match="rank 0"):
        gkpd.KroneckerLinear(64, 32, a_shape=(4, 4), rank=0)
    with pytest.raises(ValueError, match="rank 17"):
        gkpd.KroneckerLinear(64, 32, a_shape=(4, 4), rank=17)
    with pytest.raises(TypeError, match="nn.Linear"):
        gkpd.KroneckerLinear.from_dense(nn.Conv1d(4, 4, 1), a_shape=(2, 2))
    with pytest.raises(ValueError, match="in_features"):
        gkpd.KroneckerLinear(64, 32, a_shape=(4, 4), rank=1)(torch.randn(3, 32))
