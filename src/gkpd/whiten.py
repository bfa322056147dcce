"""Data-aware GKPD: Kronecker factors that minimise a layer's *output* error on calibration
inputs instead of its weight error (docs: the design note, "Data-aware GKPD").

For a layer with input vectors ``x`` (a linear layer's input, a convolution's input patch in
the weight's ``(c, k…)`` order) the output error of a replacement ``Ŵ`` is
``E‖(W − Ŵ)x‖² = tr(ΔW S ΔWᵀ)`` with ``S = E[x xᵀ]``. Split x's index the way the factors split
it, ``p = (c1, k1…)`` for A and ``q = (c2, k2…)`` for B. When ``S = S_A ⊗ S_B`` in that order,
``L_A = S_A^½`` and ``L_B = S_B^½`` turn the weighted problem into the ordinary one, because
``(A ⊗ B)(L_A ⊗ L_B) = (A L_A) ⊗ (B L_B)``: the rank-R solution is the NKP (rearrange, SVD) of
the whitened weight, un-whitened by ``L_A⁻¹``, ``L_B⁻¹``, and its tail singular values give the
output error of every rank at once. A measured S is not Kronecker-factored; ``S_A ⊗ S_B`` is
then its nearest Kronecker product (itself a rank-1 NKP of S) and the result an approximation,
so :func:`output_error` measures the real error under the full S.

Everything is computed in float64; covariances are damped, ``S + λ·mean(diag S)·I``, so that
rank-deficient inputs (dead channels, zero padding) still have an inverse square root.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkpd.decompose import KroneckerFactors, check_factor_shapes, check_rank, rearrange

__all__ = [
    "InputCovariance",
    "corrected_weight",
    "WhitenedSplit",
    "decompose_whitened",
    "input_patches",
    "nearest_kronecker_covariance",
    "output_error",
    "whitened_svd",
]

DEFAULT_DAMPING = 0.01
# Power iterations of the covariance's nearest Kronecker product: started from the partial
# traces (the K-FAC estimate), which is already close, they converge in a few steps.
_NKP_ITERATIONS = 30


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def has_input_vectors(module: nn.Module) -> bool:
    """Whether ``module`` reads input vectors to whiten: a conv or linear layer (an
    embedding reads token ids, so its factors stay plain GKPD's)."""
    return isinstance(module, nn.Linear) or _is_conv(module)


def input_width(module: nn.Module) -> int:
    """Length of the input vector one output of ``module`` reads (a patch for a conv)."""
    weight = module.weight
    return math.prod(weight.shape[1:])


def input_patches(module: nn.Module, x: Tensor) -> Tensor:
    """The input vectors of ``module`` (conv or linear) on its input ``x``: a ``(rows, D)``
    matrix whose columns follow the weight's input modes ``(c, k…)``; for a grouped conv every
    group's patch is its own row (so the covariance is the mean over groups)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, module.in_features)
    if not _is_conv(module):
        raise TypeError(f"expected a conv or linear layer, got {type(module).__name__}")
    n = len(module.kernel_size)
    if x.dim() == n + 1:  # unbatched
        x = x.unsqueeze(0)
    if x.dim() != n + 2 or x.shape[1] != module.in_channels:
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not fit {module}: expected "
            f"(N, {module.in_channels}, {n} spatial dims)"
        )
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        x = _pad_like(module, x)
    else:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
        x = F.pad(x, pads) if any(pads) else x
    for i, (k, s, d) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    # (N, C, O…, K…) -> (N, O…, C, K…) -> rows of (C/g · ∏K) per group
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    x = x.permute(perm)
    g = module.groups
    return x.reshape(-1, g, module.in_channels // g, *module.kernel_size).reshape(
        -1, input_width(module)
    )


def _pad_like(module: nn.Module, x: Tensor) -> Tensor:
    """The padded input a conv with a non-zero padding mode (or 'same') actually convolves."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x
        pads = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for p in reversed(module.padding) for _ in range(2)]
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


class InputCovariance:
    """Running second moment ``E[x xᵀ]`` (float64) of a layer's input vectors."""

    def __init__(self, module: nn.Module):
        self.module = module
        width = input_width(module)
        self._sum = torch.zeros(width, width, dtype=torch.float64)
        self.count = 0

    def update(self, x: Tensor) -> None:
        # the product in the input's precision (float32: ~30x faster than float64 on CPU, and
        # a batch's sum is then accumulated in float64)
        rows = input_patches(self.module, x.detach())
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        product = (rows.T @ rows).to("cpu", torch.float64)
        if not torch.isfinite(product).all():  # a NaN or inf input shows in its product
            raise ValueError(
                "calibration inputs produce non-finite activations (NaN or inf) at a layer "
                f"{self.module}: check the calibration data"
            )
        self._sum += product
        self.count += rows.shape[0]

    @property
    def matrix(self) -> Tensor:
        if self.count == 0:
            raise ValueError(f"no calibration input reached the layer {self.module}")
        return self._sum / self.count


def _split_input(
    weight_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    a, b = check_factor_shapes(weight_shape, a_shape, b_shape)
    return a[1:], b[1:]


def _to_pq(cov: Tensor, a_in: Sequence[int], b_in: Sequence[int]) -> Tensor:
    """``cov`` (index ``(c, k…)`` on both sides) as the 4-way tensor ``S[p, q, p', q']``."""
    n = len(a_in)
    inter = [x for pair in zip(a_in, b_in, strict=True) for x in pair]
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    full = perm + [2 * n + i for i in perm]
    p, q = math.prod(a_in), math.prod(b_in)
    return cov.reshape(*inter, *inter).permute(full).reshape(p, q, p, q)


def nearest_kronecker_covariance(
    cov: Tensor, a_in: Sequence[int], b_in: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """``(S_A, S_B)``, symmetric positive semi-definite, with ``S_A ⊗ S_B`` (in the ``(p, q)``
    order) the nearest Kronecker product to ``cov`` in Frobenius norm; exact when ``cov`` is
    one. The scale is split so that ``tr S_A / P = tr S_B / Q``."""
    s = _to_pq(cov.to(torch.float64), a_in, b_in)
    p, q = s.shape[0], s.shape[1]
    s_b = s.diagonal(0, 0, 2).sum(-1)  # Σ_p S[p, q, p, q']: the partial trace over A
    for _ in range(_NKP_ITERATIONS):
        s_a = torch.einsum("pqrs,qs->pr", s, s_b)
        s_a = s_a / s_a.norm().clamp_min(torch.finfo(torch.float64).tiny)
        s_b, previous = torch.einsum("pqrs,pr->qs", s, s_a), s_b
        if torch.allclose(s_b, previous, rtol=1e-12, atol=0):
            break
    if torch.trace(s_a) < 0:  # the rank-1 term's sign is free
        s_a, s_b = -s_a, -s_b
    s_a, s_b = _psd(s_a), _psd(s_b)
    ta, tb = float(torch.trace(s_a)) / p, float(torch.trace(s_b)) / q
    if ta > 0 and tb > 0:
        scale = math.sqrt(tb / ta)
        s_a, s_b = s_a * scale, s_b / scale
    return s_a, s_b


def _psd(m: Tensor) -> Tensor:
    m = (m + m.T) / 2
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp_min(0)) @ vectors.T


def _damped_roots(s: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """``(S_λ^½, S_λ^-½)`` of ``S_λ = S + λ·mean(diag S)·I`` (identity for ``S = 0``)."""
    mean_diag = float(torch.diagonal(s).mean())
    if mean_diag <= 0:
        eye = torch.eye(s.shape[0], dtype=torch.float64)
        return eye, eye
    values, vectors = torch.linalg.eigh(s + damping * mean_diag * torch.eye(s.shape[0],
                                                                            dtype=s.dtype))
    values = values.clamp_min(damping * mean_diag if damping > 0 else 0.0)
    if not damping > 0 and float(values.min()) <= 0:
        raise ValueError(
            "the calibration covariance is singular (rank-deficient inputs); use damping > 0"
        )
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T


def _check_covariance(cov: Tensor, weight_shape: Sequence[int], damping: float) -> None:
    width = math.prod(weight_shape[1:])
    if tuple(cov.shape) != (width, width):
        raise ValueError(
            f"covariance has shape {tuple(cov.shape)}, expected {(width, width)} for a "
            f"weight of shape {tuple(weight_shape)}"
        )
    if not torch.isfinite(cov).all():
        raise ValueError("the calibration covariance has non-finite entries (NaN or inf)")
    if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping >= 0:
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")


def whitened_svd(
    matrices: Tensor, cov: Tensor, *, damping: float = DEFAULT_DAMPING
) -> tuple[Tensor, Tensor, Tensor]:
    """Activation-aware SVD of a batch of weight matrices ``(g, F, D)`` whose rows read input
    vectors with second moment ``cov`` ``(D, D)``: ``(u, s, vh)`` in float64 on the CPU,
    with ``u s vh = matrices`` and ``vh = V_wᵀ S_λ^-½`` for the SVD ``U_w s V_wᵀ`` of the
    whitened ``matrices·S_λ^½``. Truncated to rank r it is the rank-r matrix of least output error
    ``tr(ΔW S_λ ΔWᵀ)`` (Eckart–Young in the whitened space; no Kronecker approximation:
    the whole covariance is used), and ``s``'s tail gives that error for every rank."""
    _check_covariance(cov, (matrices.shape[-2], matrices.shape[-1]), damping)
    root, inv_root = _damped_roots(cov.to(torch.float64), damping)
    u, s, vh = torch.linalg.svd(matrices.to("cpu", torch.float64) @ root, full_matrices=False)
    return u, s, vh @ inv_root


@dataclass(frozen=True)
class WhitenedSplit:
    """The whitening of one factor split: ``L_A``, ``L_B`` and their inverses (float64)."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    root_a: Tensor
    inv_root_a: Tensor
    root_b: Tensor
    inv_root_b: Tensor

    @classmethod
    def from_covariance(
        cls, cov: Tensor, weight_shape: Sequence[int], a_shape: Sequence[int],
        b_shape: Sequence[int] | None = None, *, damping: float = DEFAULT_DAMPING,
    ) -> WhitenedSplit:
        a, b = check_factor_shapes(weight_shape, a_shape, b_shape)
        _check_covariance(cov, weight_shape, damping)
        s_a, s_b = nearest_kronecker_covariance(cov, a[1:], b[1:])
        root_a, inv_a = _damped_roots(s_a, damping)
        root_b, inv_b = _damped_roots(s_b, damping)
        return cls(a, b, root_a, inv_a, root_b, inv_b)

    def _apply(self, m: Tensor, left: Tensor, right: Tensor) -> Tensor:
        """``m`` (rearranged weight, rows ``(f1, p)``, columns ``(f2, q)``) with ``left`` applied
        on ``p`` and ``right`` on ``q``."""
        f1, f2 = self.a_shape[0], self.b_shape[0]
        p, q = left.shape[0], right.shape[0]
        m4 = m.reshape(f1, p, f2, q)
        return torch.einsum("apbq,pr,qs->arbs", m4, left, right).reshape(f1 * p, f2 * q)

    def whiten(self, m: Tensor) -> Tensor:
        return self._apply(m.to(torch.float64), self.root_a, self.root_b)

    def unwhiten_factors(self, fa: Tensor, fb: Tensor) -> tuple[Tensor, Tensor]:
        """Factors ``(R, ∏a)``, ``(R, ∏b)`` of the whitened problem back in weight space."""
        r = fa.shape[0]
        f1, f2 = self.a_shape[0], self.b_shape[0]
        fa = torch.einsum("rap,ps->ras", fa.reshape(r, f1, -1), self.inv_root_a)
        fb = torch.einsum("rbq,qs->rbs", fb.reshape(r, f2, -1), self.inv_root_b)
        return fa.reshape(r, -1), fb.reshape(r, -1)


def decompose_whitened(
    w: Tensor,
    cov: Tensor,
    a_shape: Sequence[int],
    b_shape: Sequence[int] | None = None,
    rank: int | None = None,
    *,
    damping: float = DEFAULT_DAMPING,
    split: WhitenedSplit | None = None,
) -> KroneckerFactors:
    """Rank-``rank`` GKPD of ``w`` that minimises the output error on inputs whose second
    moment is ``cov`` (``(D, D)``, D the product of ``w``'s input modes), approximated by its
    nearest Kronecker product and damped by ``damping``.

    ``singular_values`` are those of the whitened problem: ``error_at(r)`` is the relative
    output error ``sqrt(tr(ΔW S ΔWᵀ) / tr(W S Wᵀ))`` under the damped Kronecker-factored
    ``S``. Each term's factors have equal norms. With ``cov`` the identity and ``damping=0``
    this is :func:`gkpd.decompose`.
    """
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError("w must be a floating-point torch.Tensor")
    a, b = check_factor_shapes(w.shape, a_shape, b_shape)
    r = check_rank(rank, a, b)
    if split is None:
        split = WhitenedSplit.from_covariance(cov, w.shape, a, b, damping=damping)
    m = split.whiten(rearrange(w.detach().cpu(), a, b))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:r].sqrt()
    fa, fb = split.unwhiten_factors(u[:, :r].T * root[:, None], vh[:r] * root[:, None])
    balance = (fb.norm(dim=1) / fa.norm(dim=1).clamp_min(1e-300)).sqrt()
    balance = torch.where(torch.isfinite(balance) & (balance > 0), balance, 1.0)
    fa, fb = fa * balance[:, None], fb / balance[:, None]
    dtype, device = w.dtype, w.device
    return KroneckerFactors(
        fa.reshape(r, *a).to(device, dtype),
        fb.reshape(r, *b).to(device, dtype),
        s.to(device, dtype),
    )


# Ridge of the least-squares step of sequential whitening, relative to the mean diagonal: small,
# so that a layer whose inputs did not change keeps its weight (W' = W when x̃ = x).
SEQUENTIAL_RIDGE = 1e-4


def corrected_weight(
    w: Tensor, own: Tensor, cross: Tensor, ridge: float = SEQUENTIAL_RIDGE
) -> Tensor:
    """The weight ``W' = W E[x x̃ᵀ] (E[x̃ x̃ᵀ] + λ·mean(diag)·I)⁻¹`` whose outputs on the
    inputs ``x̃`` a compressed model feeds this layer come closest to the original outputs
    ``W x``: ``‖W x − Ŵ x̃‖² = ‖(W' − Ŵ) x̃‖² + const``, so the sequential step decomposes ``W'``
    under ``E[x̃ x̃ᵀ]``."""
    own = own.to(torch.float64)
    eye = torch.eye(own.shape[0], dtype=torch.float64)
    damped = own + ridge * float(torch.diagonal(own).mean().clamp_min(1e-300)) * eye
    w2 = w.detach().reshape(w.shape[0], -1).to("cpu", torch.float64)
    target = torch.linalg.solve(damped, (w2 @ cross.to(torch.float64)).T).T
    return target.reshape(w.shape).to(w.device, w.dtype)


def output_error(w: Tensor, approx: Tensor, cov: Tensor) -> float:
    """Relative output error ``sqrt(tr(ΔW S ΔWᵀ) / tr(W S Wᵀ))`` of ``approx`` for ``w`` under
    the full covariance ``cov`` (no Kronecker approximation, no damping)."""
    w2 = w.detach().reshape(w.shape[0], -1).to("cpu", torch.float64)
    d2 = w2 - approx.detach().reshape(w.shape[0], -1).to("cpu", torch.float64)
    cov = cov.to(torch.float64)
    total = float(torch.einsum("fd,de,fe->", w2, cov, w2))
    if total <= 0:
        return 0.0
    err = float(torch.einsum("fd,de,fe->", d2, cov, d2))
    return math.sqrt(max(err, 0.0) / total)
