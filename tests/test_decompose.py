import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gkpd
from gkpd.decompose import b_shape_for, check_rank, full_rank, unrearrange

f64 = torch.float64


@st.composite
def factor_shapes(draw, max_modes=4):
    n = draw(st.integers(1, max_modes))
    a = tuple(draw(st.integers(1, 4)) for _ in range(n))
    b = tuple(draw(st.integers(1, 4)) for _ in range(n))
    return a, b


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@settings(deadline=None, max_examples=60)
@given(factor_shapes(), st.integers(0, 2**31))
def test_kron_matches_torch_kron(shapes, seed):
    a_shape, b_shape = shapes
    g = _gen(seed)
    a = torch.randn(a_shape, generator=g, dtype=f64)
    b = torch.randn(b_shape, generator=g, dtype=f64)
    torch.testing.assert_close(gkpd.kron(a, b), torch.kron(a, b), rtol=0, atol=0)


@settings(deadline=None, max_examples=60)
@given(factor_shapes(), st.integers(1, 4), st.integers(0, 2**31))
def test_kron_sum_and_rearrange(shapes, r, seed):
    a_shape, b_shape = shapes
    g = _gen(seed)
    a = torch.randn(r, *a_shape, generator=g, dtype=f64)
    b = torch.randn(r, *b_shape, generator=g, dtype=f64)
    w = gkpd.kron_sum(a, b)
    expected = sum(torch.kron(a[i], b[i]) for i in range(r))
    torch.testing.assert_close(w, expected, rtol=1e-12, atol=1e-12)
    m = gkpd.rearrange(w, a_shape, b_shape)
    assert m.shape == (math.prod(a_shape), math.prod(b_shape))
    torch.testing.assert_close(m, a.reshape(r, -1).T @ b.reshape(r, -1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(unrearrange(m, a_shape, b_shape), w, rtol=0, atol=0)


@settings(deadline=None, max_examples=80)
@given(factor_shapes(), st.integers(0, 2**31), st.data())
def test_decompose_full_and_truncated(shapes, seed, data):
    a_shape, b_shape = shapes
    w_shape = tuple(x * y for x, y in zip(a_shape, b_shape, strict=True))
    w = torch.randn(w_shape, generator=_gen(seed), dtype=f64)
    full = gkpd.decompose(w, a_shape, b_shape)
    assert full.rank == full_rank(a_shape, b_shape) == full.singular_values.numel()
    assert full.a.shape == (full.rank, *a_shape) and full.b.shape == (full.rank, *b_shape)
    rel = (full.reconstruct() - w).norm() / w.norm()
    assert rel < 1e-12
    assert full.relative_error < 1e-7  # sqrt of rounding-level tail
    s = full.singular_values
    assert torch.all(s[:-1] >= s[1:])
    rank = data.draw(st.integers(1, full.rank))
    f = gkpd.decompose(w, a_shape, rank=rank)
    assert f.rank == rank and f.b_shape == b_shape
    actual = ((f.reconstruct() - w).norm() / w.norm()).item()
    tail = (s[rank:].square().sum().sqrt() / s.square().sum().sqrt()).item()
    assert f.relative_error == pytest.approx(tail, rel=1e-9, abs=1e-12)
    assert actual == pytest.approx(tail, rel=1e-9, abs=1e-7)
    errs = full.relative_errors()
    assert errs.shape == (full.rank + 1,) and errs[0] == pytest.approx(1.0)
    assert torch.all(errs[:-1] >= errs[1:] - 1e-15)
    assert full.error_at(rank) == pytest.approx(f.relative_error, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(full.truncate(rank).reconstruct(), f.reconstruct())


def test_decompose_recovers_exact_kronecker_product():
    g = _gen(0)
    a = torch.randn(2, 6, 4, 3, 3, generator=g, dtype=f64)
    b = torch.randn(2, 4, 8, 1, 1, generator=g, dtype=f64)
    w = gkpd.kron_sum(a, b)
    f = gkpd.decompose(w, (6, 4, 3, 3), rank=2)
    assert f.relative_error < 1e-7
    torch.testing.assert_close(f.reconstruct(), w)
    assert gkpd.decompose(w, (6, 4, 3, 3)).error_at(2) < 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decompose_dtypes(dtype):
    w = torch.randn(8, 6, 3, 3).to(dtype)
    f = gkpd.decompose(w, (4, 3, 3, 1))
    assert f.a.dtype == f.b.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((f.reconstruct().float() - w.float()).norm() / w.float().norm()) < tol


def test_decompose_does_not_track_gradients():
    w = torch.randn(4, 4, requires_grad=True)
    f = gkpd.decompose(w, (2, 2))
    assert not f.a.requires_grad


def test_zero_weight_has_zero_error():
    f = gkpd.decompose(torch.zeros(4, 4, dtype=f64), (2, 2), rank=1)
    assert f.relative_error == 0.0


def test_bad_inputs():
    w = torch.randn(64, 64, 3, 3)
    with pytest.raises(ValueError, match=r"a_shape \(3, 2, 3, 3\) does not divide weight shape "
                                         r"\(64, 64, 3, 3\) on mode 0"):
        gkpd.decompose(w, (3, 2, 3, 3))
    with pytest.raises(ValueError, match="modes"):
        gkpd.decompose(w, (4, 4, 3))
    with pytest.raises(ValueError, match="b_shape"):
        gkpd.decompose(w, (4, 4, 3, 3), (16, 16, 1, 3))
    with pytest.raises(ValueError, match=r"rank 0 is out of range"):
        gkpd.decompose(w, (4, 4, 3, 3), rank=0)
    with pytest.raises(ValueError, match=r"rank 145 is out of range: expected 1 <= rank <= 144"):
        gkpd.decompose(w, (4, 4, 3, 3), rank=145)
    with pytest.raises(TypeError, match="rank"):
        gkpd.decompose(w, (4, 4, 3, 3), rank=2.0)
    with pytest.raises(TypeError, match="floating dtype"):
        gkpd.decompose(torch.ones(4, 4, dtype=torch.int64), (2, 2))
    with pytest.raises(TypeError, match="a_shape"):
        gkpd.decompose(w, "4433")
    with pytest.raises(ValueError, match="a_shape"):
        gkpd.decompose(w, (0, 4, 3, 3))
    with pytest.raises(ValueError, match="same number of modes"):
        gkpd.kron(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="same number of terms"):
        gkpd.kron_sum(torch.ones(2, 2, 2), torch.ones(3, 2, 2))
    f = gkpd.decompose(w, (4, 4, 3, 3), rank=3)
    with pytest.raises(ValueError, match="rank 200"):
        f.error_at(200)


def test_helpers():
    assert b_shape_for((256, 256, 3, 3), (16, 16, 3, 1)) == (16, 16, 1, 3)
    assert full_rank((64, 64, 3, 3), (4, 4, 1, 1)) == 16
    assert check_rank(None, (2, 2), (3, 3)) == 4
