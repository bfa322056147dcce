"""The Generalized Kronecker Product Decomposition of a tensor (docs/design.md §1–§2).

A tensor ``W`` of shape ``a ⊙ b`` is approximated by ``Σ_r A_r ⊗ B_r``. Rearranging ``W`` into
the matrix ``M(W)`` of shape ``(∏a, ∏b)`` (one reshape–permute–reshape) turns the problem into a
truncated SVD of ``M`` (Van Loan–Pitsianis), whose singular values give the error of every rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KroneckerFactors",
    "b_shape_for",
    "check_factor_shapes",
    "check_rank",
    "decompose",
    "divisors",
    "full_rank",
    "kron",
    "kron_sum",
    "rearrange",
    "unrearrange",
]


# ----------------------------------------------------------------------------- validation


def as_shape(name: str, value: object) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints, or a ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
        if v < 1:
            raise ValueError(f"{name} {tuple(value)} must have positive entries")
        out.append(int(v))
    return tuple(out)


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending: the sizes a mode of ``n`` can split into."""
    return [d for d in range(1, n + 1) if n % d == 0]


def b_shape_for(weight_shape: Sequence[int], a_shape: Sequence[int]) -> tuple[int, ...]:
    """The B-factor shape ``weight_shape / a_shape`` (mode by mode), validating ``a_shape``.

    >>> b_shape_for((64, 64, 3, 3), (16, 16, 3, 1))
    (4, 4, 1, 3)
    """
    w = as_shape("weight shape", weight_shape)
    a = as_shape("a_shape", a_shape)
    if len(a) != len(w):
        raise ValueError(
            f"a_shape {a} has {len(a)} modes, expected {len(w)} like weight shape {w}"
        )
    for i, (wi, ai) in enumerate(zip(w, a, strict=True)):
        if wi % ai:
            raise ValueError(f"a_shape {a} does not divide weight shape {w} on mode {i}")
    return tuple(wi // ai for wi, ai in zip(w, a, strict=True))


def check_factor_shapes(
    weight_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate ``a_shape`` (and ``b_shape`` if given) against ``weight_shape``; return both."""
    expected_b = b_shape_for(weight_shape, a_shape)
    if b_shape is not None:
        b = as_shape("b_shape", b_shape)
        if b != expected_b:
            raise ValueError(
                f"b_shape {b} does not match weight shape {tuple(weight_shape)} / a_shape "
                f"{tuple(a_shape)}; expected {expected_b}"
            )
    return tuple(a_shape), expected_b


def full_rank(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """Full Kronecker rank ``min(∏a, ∏b)``: the most terms a decomposition can have."""
    return min(math.prod(a_shape), math.prod(b_shape))


def check_rank(rank: object, a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """``rank`` as an int in ``[1, full_rank]``; ``None`` means full rank."""
    full = full_rank(a_shape, b_shape)
    if rank is None:
        return full
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int or None, got {rank!r}")
    if not 1 <= rank <= full:
        raise ValueError(
            f"rank {rank} is out of range: expected 1 <= rank <= {full} (the full Kronecker "
            f"rank of a_shape {tuple(a_shape)} and b_shape {tuple(b_shape)})"
        )
    return int(rank)


def _check_float(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")


# ----------------------------------------------------------------------------- products


def _interleave(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [x for pair in zip(a, b, strict=True) for x in pair]


def kron(a: Tensor, b: Tensor) -> Tensor:
    """Multidimensional Kronecker product: ``out[i] = a[i // b.shape] * b[i % b.shape]``.

    Equals ``torch.kron`` for tensors with the same number of modes.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("kron expects two tensors")
    if a.dim() != b.dim():
        raise ValueError(
            f"kron expects tensors with the same number of modes, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    n = a.dim()
    a_view = a.reshape(_interleave(a.shape, [1] * n))
    b_view = b.reshape(_interleave([1] * n, b.shape))
    return (a_view * b_view).reshape([x * y for x, y in zip(a.shape, b.shape, strict=True)])


def kron_sum(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_r a[r] ⊗ b[r]`` for ``a: (R, *a_shape)`` and ``b: (R, *b_shape)``.

    Computed as one ``(∏a, R) @ (R, ∏b)`` product and the inverse rearrangement, so it is
    differentiable and cheap.
    """
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError("kron_sum expects two tensors")
    if a.dim() != b.dim() or a.dim() < 2:
        raise ValueError(
            f"kron_sum expects factors (R, *a_shape) and (R, *b_shape) with the same number of "
            f"modes, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"kron_sum expects the same number of terms R in both factors, got "
            f"{a.shape[0]} and {b.shape[0]}"
        )
    r = a.shape[0]
    m = a.reshape(r, -1).transpose(0, 1) @ b.reshape(r, -1)
    return unrearrange(m, tuple(a.shape[1:]), tuple(b.shape[1:]))


def rearrange(w: Tensor, a_shape: Sequence[int], b_shape: Sequence[int] | None = None) -> Tensor:
    """The Van Loan–Pitsianis rearrangement ``M(w)`` of shape ``(∏a, ∏b)``.

    Row ``i`` of ``M`` is the flattened ``i``-th block of ``w`` (a block has shape ``b_shape``),
    so ``M(A ⊗ B) = vec(A) vec(B)ᵀ``.
    """
    if not isinstance(w, Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    a, b = check_factor_shapes(w.shape, a_shape, b_shape)
    n = len(a)
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    return w.reshape(_interleave(a, b)).permute(perm).reshape(math.prod(a), math.prod(b))


def unrearrange(m: Tensor, a_shape: Sequence[int], b_shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`rearrange`: the tensor of shape ``a ⊙ b`` whose ``M`` is ``m``."""
    a = as_shape("a_shape", a_shape)
    b = as_shape("b_shape", b_shape)
    if len(a) != len(b):
        raise ValueError(f"a_shape {a} and b_shape {b} must have the same number of modes")
    if tuple(m.shape) != (math.prod(a), math.prod(b)):
        raise ValueError(
            f"m has shape {tuple(m.shape)}, expected {(math.prod(a), math.prod(b))} for "
            f"a_shape {a} and b_shape {b}"
        )
    n = len(a)
    perm = _interleave(range(n), range(n, 2 * n))
    return m.reshape(*a, *b).permute(perm).reshape([x * y for x, y in zip(a, b, strict=True)])


# ----------------------------------------------------------------------------- decomposition


@dataclass(frozen=True, eq=False)
class KroneckerFactors:
    """Result of :func:`decompose`: ``w ≈ Σ_r a[r] ⊗ b[r]``.

    ``singular_values`` holds all ``min(∏a, ∏b)`` singular values of the rearranged weight,
    so the error of every rank is known (:meth:`error_at`, :meth:`relative_errors`).
    """

    a: Tensor
    b: Tensor
    singular_values: Tensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def a_shape(self) -> tuple[int, ...]:
        return tuple(self.a.shape[1:])

    @property
    def b_shape(self) -> tuple[int, ...]:
        return tuple(self.b.shape[1:])

    @property
    def full_rank(self) -> int:
        return int(self.singular_values.numel())

    def relative_errors(self) -> Tensor:
        """``e[k] = ‖w − Σ_{r<k} a_r ⊗ b_r‖ / ‖w‖`` for ``k = 0 … full_rank`` (float64, CPU)."""
        s2 = self.singular_values.detach().to("cpu", torch.float64) ** 2
        tail = torch.cat([s2.flip(0).cumsum(0).flip(0), s2.new_zeros(1)])
        total = tail[0]
        if total == 0:
            return torch.zeros_like(tail)
        return (tail / total).sqrt()

    def error_at(self, rank: int) -> float:
        """Relative Frobenius error of the best rank-``rank`` approximation (no extra SVD)."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {rank!r}")
        if not 0 <= rank <= self.full_rank:
            raise ValueError(f"rank {rank} is out of range: expected 0 <= rank <= {self.full_rank}")
        return float(self.relative_errors()[rank])

    @property
    def relative_error(self) -> float:
        """Relative Frobenius error ``‖w − reconstruct()‖ / ‖w‖`` of these factors."""
        return self.error_at(self.rank)

    def truncate(self, rank: int) -> KroneckerFactors:
        """The first ``rank`` terms (the best rank-``rank`` approximation)."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, got {rank!r}")
        if not 1 <= rank <= self.rank:
            raise ValueError(f"rank {rank} is out of range: expected 1 <= rank <= {self.rank}")
        return KroneckerFactors(self.a[:rank], self.b[:rank], self.singular_values)

    def reconstruct(self) -> Tensor:
        """``Σ_r a[r] ⊗ b[r]``."""
        return kron_sum(self.a, self.b)


def decompose(
    w: Tensor,
    a_shape: Sequence[int],
    b_shape: Sequence[int] | None = None,
    rank: int | None = None,
) -> KroneckerFactors:
    """Optimal rank-``rank`` GKPD of ``w``: ``w ≈ Σ_{r<rank} a[r] ⊗ b[r]``.

    ``b_shape`` defaults to ``w.shape / a_shape``; ``rank=None`` means full Kronecker rank
    (exact reconstruction). Works for any number of modes, on any device, for any floating dtype
    (half precision is computed in float32 and cast back). Costs one thin SVD of the
    ``(∏a, ∏b)`` rearranged matrix.
    """
    _check_float("w", w)
    a, b = check_factor_shapes(w.shape, a_shape, b_shape)
    r = check_rank(rank, a, b)
    compute_dtype = w.dtype
    if w.dtype in (torch.float16, torch.bfloat16):
        compute_dtype = torch.float32
    # M in column-major layout (LAPACK's): the copy then moves runs of the a-modes, and the
    # SVD needs no copy of its own.
    n = len(a)
    perm = list(range(1, 2 * n, 2)) + list(range(0, 2 * n, 2))
    w_c = w.detach().to(compute_dtype).reshape(_interleave(a, b))
    m = w_c.permute(perm).reshape(math.prod(b), math.prod(a)).transpose(0, 1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:r].sqrt()
    fa = (u[:, :r] * root).transpose(0, 1).reshape(r, *a)
    fb = (vh[:r] * root[:, None]).reshape(r, *b)
    return KroneckerFactors(fa.to(w.dtype), fb.to(w.dtype), s.to(w.dtype))
