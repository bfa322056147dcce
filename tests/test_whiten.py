import math

import pytest
import torch
from torch import nn

from gkpd.decompose import decompose, kron, kron_sum
from gkpd.whiten import (
    InputCovariance,
    WhitenedSplit,
    decompose_whitened,
    input_patches,
    nearest_kronecker_covariance,
    output_error,
)


def random_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return m @ m.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize(
    "weight_shape, a_shape",
    [
        ((6, 8, 3, 3), (2, 4, 3, 1)),
        ((12, 6), (3, 2)),
        ((4, 6, 3), (2, 3, 1)),
        ((8, 4, 1, 1), (2, 2, 1, 1)),
    ],
)
def test_kronecker_factored_covariance_is_recovered_and_errors_are_exact(weight_shape, a_shape):
    g = torch.Generator().manual_seed(0)
    b_shape = tuple(w // a for w, a in zip(weight_shape, a_shape, strict=True))
    a_in, b_in = a_shape[1:], b_shape[1:]
    p, q = math.prod(a_in), math.prod(b_in)
    s_a, s_b = random_spd(p, g), random_spd(q, g)
    # a covariance that is S_A ⊗ S_B in the (p, q) order, written in the (c, k…) order: the
    # multidimensional kron of (P-modes)x(P-modes) and (Q-modes)x(Q-modes) tensors does it
    cov = kron(s_a.reshape(*a_in, *a_in), s_b.reshape(*b_in, *b_in)).reshape(p * q, p * q)
    got_a, got_b = nearest_kronecker_covariance(cov, a_in, b_in)
    assert torch.allclose(kron(got_a, got_b), torch.kron(s_a, s_b), atol=1e-9)

    w = torch.randn(weight_shape, generator=g, dtype=torch.float64)
    factors = decompose_whitened(w, cov, a_shape, rank=None, damping=0.0)
    full = factors.full_rank
    assert torch.allclose(factors.reconstruct(), w, atol=1e-8)  # full rank is exact
    for rank in range(1, full):
        approx = decompose_whitened(w, cov, a_shape, rank=rank, damping=0.0)
        # the whitened spectrum's tail is the output error under the full covariance
        assert output_error(w, approx.reconstruct(), cov) == pytest.approx(
            approx.error_at(rank), rel=1e-6, abs=1e-9
        )
        # and no worse than the plain GKPD's factors on that error
        plain = decompose(w, a_shape, rank=rank)
        assert output_error(w, approx.reconstruct(), cov) <= output_error(
            w, plain.reconstruct(), cov
        ) + 1e-9


def test_identity_covariance_is_plain_gkpd():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    a_shape = (4, 2, 3, 1)
    eye = torch.eye(6 * 9, dtype=torch.float64)
    for rank in (1, 3, 5):
        whitened = decompose_whitened(w, eye, a_shape, rank=rank, damping=0.0)
        plain = decompose(w, a_shape, rank=rank)
        assert torch.allclose(whitened.singular_values, plain.singular_values, atol=1e-10)
        assert torch.allclose(whitened.reconstruct(), plain.reconstruct(), atol=1e-10)
        assert whitened.error_at(rank) == pytest.approx(plain.error_at(rank), abs=1e-12)


def test_factor_norms_are_balanced_per_term():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=g)
    x = torch.randn(32, 4, 7, 7, generator=g) * torch.tensor([5.0, 1.0, 0.1, 2.0]).view(1, 4, 1, 1)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    cov = InputCovariance(conv)
    cov.update(x)
    factors = decompose_whitened(w, cov.matrix, (3, 2, 3, 1), rank=3)
    a_norms = factors.a.reshape(3, -1).norm(dim=1)
    b_norms = factors.b.reshape(3, -1).norm(dim=1)
    assert torch.allclose(a_norms, b_norms, rtol=1e-4)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, bias=False),
        nn.Conv2d(4, 6, (3, 1), padding="same", padding_mode="reflect", bias=False),
        nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", bias=False),
        nn.Conv3d(2, 4, 3, padding=1, bias=False),
        nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False),
        nn.Linear(12, 6, bias=False),
    ],
    ids=["conv2d", "strided-dilated", "same-reflect", "conv1d-circular", "conv3d", "grouped",
         "linear"],
)
def test_output_error_matches_the_measured_output(layer):
    """The covariance of the input patches predicts ‖(W − Ŵ) ∗ x‖ on the data it came from."""
    g = torch.Generator().manual_seed(3)
    if isinstance(layer, nn.Linear):
        x = torch.randn(40, 5, 12, generator=g)
    else:
        n = len(layer.kernel_size)
        x = torch.randn(6, layer.in_channels, *([6] * n), generator=g)
    cov = InputCovariance(layer)
    cov.update(x[: len(x) // 2])
    cov.update(x[len(x) // 2 :])
    with torch.no_grad():
        layer.weight.normal_(generator=g)
    w = layer.weight.detach().clone()
    approx = w * (1 + 0.3 * torch.randn(w.shape, generator=g))
    if getattr(layer, "groups", 1) > 1:  # one group's input only: equal groups' statistics
        x = torch.cat([x[:, :2], x[:, :2]], dim=1)
        cov = InputCovariance(layer)
        cov.update(x)
    with torch.no_grad():
        dense = layer(x)
        layer.weight.copy_(approx)
        other = layer(x)
    measured = float((dense - other).norm() / dense.norm())
    assert output_error(w, approx, cov.matrix) == pytest.approx(measured, rel=1e-5)


def test_patches_count_every_output_position():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    rows = input_patches(conv, x)
    assert rows.shape == (2 * 5 * 5, 27)
    # the patch of output (0, 0) of image 0 is the zero-padded top-left 3x3 window
    top_left = torch.nn.functional.pad(x, (1, 1, 1, 1))[0, :, :3, :3].reshape(-1)
    assert torch.equal(rows[0], top_left)


def test_whitening_lowers_the_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)  # the conv's init: the outcome must not hang on earlier tests' draws
    conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    mix = torch.randn(8, 8, generator=g)
    x = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 8, 8, 8, generator=g))
    cov = InputCovariance(conv)
    cov.update(x)
    w = conv.weight.detach()
    whitened = decompose_whitened(w, cov.matrix, (4, 2, 3, 1), rank=2)
    plain = decompose(w, (4, 2, 3, 1), rank=2)
    assert output_error(w, whitened.reconstruct(), cov.matrix) < output_error(
        w, plain.reconstruct(), cov.matrix
    )


def test_bad_covariances_are_refused_with_their_argument():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match="covariance has shape"):
        decompose_whitened(w, torch.eye(5), (2, 3))
    bad = torch.eye(6)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        decompose_whitened(w, bad, (2, 3))
    with pytest.raises(ValueError, match="damping"):
        decompose_whitened(w, torch.eye(6), (2, 3), damping=-1)
    singular = torch.zeros(6, 6)
    singular[0, 0] = 1.0
    with pytest.raises(ValueError, match="singular"):
        decompose_whitened(w, singular, (2, 3), damping=0.0)
    # damped, the same rank-deficient covariance is fine
    assert decompose_whitened(w, singular, (2, 3), rank=1).rank == 1
    conv = nn.Conv2d(3, 4, 3)
    cov = InputCovariance(conv)
    with pytest.raises(ValueError, match="no calibration input"):
        _ = cov.matrix
    with pytest.raises(ValueError, match="does not fit"):
        cov.update(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="non-finite"):
        cov.update(torch.full((1, 3, 5, 5), float("nan")))


def test_split_checks_the_weight_shape():
    with pytest.raises(ValueError, match="does not divide"):
        WhitenedSplit.from_covariance(torch.eye(6), (4, 6), (3, 3))


def test_kron_sum_of_whitened_factors_matches_reconstruct():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    f = decompose_whitened(w, torch.eye(36, dtype=torch.float64) * 2.0, (3, 2, 1, 3), rank=2)
    assert torch.allclose(kron_sum(f.a, f.b), f.reconstruct())


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(6, 8, 3, padding=1),
    lambda: nn.Linear(12, 8),
], ids=["conv", "linear"])
def test_from_dense_with_an_input_covariance_starts_from_the_whitened_factors(make):
    from gkpd.layers import KroneckerConv2d, KroneckerLinear

    g = torch.Generator().manual_seed(5)
    layer = make()
    if isinstance(layer, nn.Linear):
        x, a_shape, cls = torch.randn(64, 12, generator=g), (4, 3), KroneckerLinear
        x = x * torch.linspace(0.1, 3, 12)
    else:
        x, a_shape, cls = torch.randn(16, 6, 6, 6, generator=g), (4, 3, 3, 1), KroneckerConv2d
        x = x * torch.linspace(0.1, 3, 6).view(1, 6, 1, 1)
    cov = InputCovariance(layer)
    cov.update(x)
    plain = cls.from_dense(layer, a_shape=a_shape, rank=2)
    whitened = cls.from_dense(layer, a_shape=a_shape, rank=2, input_covariance=cov.matrix)
    expected = decompose_whitened(layer.weight, cov.matrix, a_shape, rank=2)
    assert torch.allclose(whitened.reconstruct_weight(), expected.reconstruct(), atol=1e-6)
    with torch.no_grad():
        dense, a, b = layer(x), plain(x), whitened(x)
    assert (dense - b).norm() < (dense - a).norm()
    with pytest.raises(ValueError, match="damping is used only"):
        cls.from_dense(layer, a_shape=a_shape, rank=2, damping=0.1)


def test_corrected_weight_is_the_least_squares_fit_of_the_original_outputs():
    from gkpd.whiten import corrected_weight

    g = torch.Generator().manual_seed(6)
    w = torch.randn(5, 8, dtype=torch.float64, generator=g)
    x = torch.randn(200, 8, dtype=torch.float64, generator=g)
    x_tilde = x + 0.3 * torch.randn(200, 8, dtype=torch.float64, generator=g)
    own, cross = x_tilde.T @ x_tilde / 200, x.T @ x_tilde / 200
    fitted = corrected_weight(w, own, cross, ridge=0.0)
    expected = torch.linalg.lstsq(x_tilde, x @ w.T).solution.T
    assert torch.allclose(fitted, expected, atol=1e-8)
    same = corrected_weight(w, x.T @ x / 200, x.T @ x / 200)
    assert torch.allclose(same, w, atol=1e-3)


def test_whitened_svd_truncation_has_the_least_output_error_of_its_rank():
    from gkpd.whiten import whitened_svd

    g = torch.Generator().manual_seed(3)
    w = torch.randn(2, 6, 10, generator=g, dtype=torch.float64)
    cov = random_spd(10, g)
    cov = cov + 3 * torch.outer(cov[0], cov[0])  # strongly correlated inputs
    u, s, vh = whitened_svd(w, cov, damping=0.0)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, w)
    rank = 3
    best = u[..., :rank] @ torch.diag_embed(s[:, :rank]) @ vh[:, :rank]
    plain_u, plain_s, plain_vh = torch.linalg.svd(w, full_matrices=False)
    plain = plain_u[..., :rank] @ torch.diag_embed(plain_s[:, :rank]) @ plain_vh[:, :rank]
    # the output error of the truncation is the tail of the whitened spectrum
    s2 = s.square()
    tail = math.sqrt(float(s2[:, rank:].sum() / s2.sum()))
    assert output_error(w.reshape(12, 10), best.reshape(12, 10), cov) == pytest.approx(tail)
    assert output_error(w.reshape(12, 10), plain.reshape(12, 10), cov) > tail + 1e-3
    # no truncation of that rank does better: perturbing the optimum only adds error
    for _ in range(5):
        nudged = best + 1e-3 * torch.randn(best.shape, generator=g, dtype=torch.float64)
        nu, ns, nvh = torch.linalg.svd(nudged, full_matrices=False)
        nudged = nu[..., :rank] @ torch.diag_embed(ns[:, :rank]) @ nvh[:, :rank]
        assert output_error(w.reshape(12, 10), nudged.reshape(12, 10), cov) >= tail - 1e-12


def test_whitened_svd_with_identity_covariance_is_the_plain_svd():
    from gkpd.whiten import whitened_svd

    w = torch.randn(1, 5, 7, dtype=torch.float64)
    _, s, _ = whitened_svd(w, torch.eye(7, dtype=torch.float64), damping=0.0)
    torch.testing.assert_close(s, torch.linalg.svdvals(w))
    with pytest.raises(ValueError, match="covariance has shape"):
        whitened_svd(w, torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="damping"):
        whitened_svd(w, torch.eye(7, dtype=torch.float64), damping=-1)
