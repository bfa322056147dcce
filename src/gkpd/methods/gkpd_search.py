"""GKPD's candidate search, in two parts (docs/design.md §2, §6).

* What does not depend on the weight's values — the factor shapes of a layer, their
  parameters, MACs, stage order and how many ranks the budget allows — is
  :func:`split_table`, computed once per layer shape (memoised: a transformer has dozens of
  linears of three shapes).
* What does — the error of every rank of each split — is :func:`tail_errors`, one spectrum
  per split and layer. Two splits whose rearranged matrices are transposes of each other (in
  every mode one factor has extent 1, e.g. ``(O, 1) ⊗ (1, I)`` and ``(1, I) ⊗ (O, 1)``, both
  the plain low-rank split) share it (:func:`spectrum_key`).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from gkpd.counting import best_order, group_split, kronecker_conv_order_macs
from gkpd.counting import kronecker_linear_order_macs as linear_order_macs
from gkpd.decompose import divisors, full_rank, rearrange

# Below this many rows/columns, or when most of the spectrum is wanted, the exact spectrum is
# cheaper than a randomized estimate.
_EXACT_SIDE = 256
_OVERSAMPLE = 10


class LayerShape(NamedTuple):
    """Everything about a layer that its candidate table depends on, except the weight's
    values: the kind (``"linear"``, ``"conv"``, ``"embedding"``), the weight shape, the input
    shape the planner saw (one sample), the bias entries, and a convolution's settings."""

    kind: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    bias: int
    conv: tuple | None = None  # (stride, padding, dilation, groups, padding_mode)

    @classmethod
    def of(cls, module: nn.Module, input_shape: tuple[int, ...]) -> LayerShape:
        weight_shape = tuple(module.weight.shape)
        bias = getattr(module, "bias", None)
        bias = 0 if bias is None else bias.numel()
        if isinstance(module, nn.Embedding):
            return cls("embedding", weight_shape, tuple(input_shape), 0)
        if isinstance(module, nn.Linear):
            return cls("linear", weight_shape, tuple(input_shape), bias)
        settings = (module.stride, module.padding, module.dilation, module.groups,
                    module.padding_mode)
        return cls("conv", weight_shape, tuple(input_shape), bias, settings)

    @property
    def groups(self) -> int:
        return 1 if self.conv is None else self.conv[3]

    def order_macs(self, a: tuple[int, ...], b: tuple[int, ...], rank: int) -> dict[str, int]:
        """MACs per stage order of the Kronecker layer with factors ``a``, ``b`` and ``rank``,
        for one sample; an embedding has one way to run, ``{"lookup": …}`` (each looked-up
        row is a sum of ``rank`` outer products of ``d1`` and ``d2`` entries)."""
        if self.kind == "embedding":
            return {"lookup": math.prod(self.input_shape) * rank * self.weight_shape[1]}
        if self.kind == "linear":
            shape = self.input_shape
            rows = math.prod(shape[1:-1]) if len(shape) > 1 else 1
            return linear_order_macs(a, b, rank, batch=rows)
        stride, padding, dilation, groups, padding_mode = self.conv
        n = len(self.weight_shape) - 2
        return kronecker_conv_order_macs(
            self.input_shape[-n:], a, b, rank, stride=stride, padding=padding,
            dilation=dilation, groups=groups, batch=1, padding_mode=padding_mode,
        )

    def rank_one(self, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[str | None, int]:
        """``(order, MACs per unit of rank)`` of the order that runs (``None``: the layer has
        no choice of order)."""
        macs = self.order_macs(a, b, 1)
        if self.kind == "embedding":
            return None, macs["lookup"]
        order = best_order(macs)
        return order, macs[order]


class Split(NamedTuple):
    """One factor shape of a layer and what the budget allows of it: ``cap`` ranks (0: none,
    unless it is the layer's smallest split), ``per_rank`` parameters and ``macs_per_rank``
    MACs each. Splits with the same ``spectrum`` have the same singular values."""

    a: tuple[int, ...]
    b: tuple[int, ...]
    per_rank: int
    order: str | None
    macs_per_rank: int
    cap: int
    spectrum: tuple[int, ...]


def factor_shapes(
    weight_shape: tuple[int, ...], groups: int = 1
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Every split ``(a, b)`` of ``weight_shape`` into factor shapes ``a ⊙ b``, both larger
    than one entry (for a grouped convolution, those its groups allow)."""
    total = math.prod(weight_shape)
    shapes = []
    for a in itertools.product(*(divisors(s) for s in weight_shape)):
        if not 1 < math.prod(a) < total:
            continue
        b = tuple(w // x for w, x in zip(weight_shape, a, strict=True))
        if groups > 1:
            try:
                group_split(groups, a, b)
            except ValueError:
                continue
        shapes.append((a, b))
    return shapes


def spectrum_key(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    """A key shared by the splits with the same singular values: ``(O, 1) ⊗ (1, I)`` and
    ``(1, I) ⊗ (O, 1)`` (in every mode one factor of extent 1) have rearranged matrices that
    are transposes of each other."""
    outer = all(min(x, y) == 1 for x, y in zip(a, b, strict=True))
    return min(a, b) if outer else a


def make_split(shape: LayerShape, a: tuple[int, ...], budget: int, max_macs: int | None) -> Split:
    b = tuple(w // x for w, x in zip(shape.weight_shape, a, strict=True))
    per_rank = math.prod(a) + math.prod(b)
    order, macs_per_rank = shape.rank_one(a, b)
    cap = min(full_rank(a, b), max(budget, 0) // per_rank)
    if max_macs is not None and macs_per_rank > 0:
        cap = min(cap, max_macs // macs_per_rank)
    return Split(a, b, per_rank, order, macs_per_rank, cap, spectrum_key(a, b))


@functools.lru_cache(maxsize=128)
def split_table(shape: LayerShape, budget: int, max_macs: int | None) -> tuple[Split, ...]:
    """Every split of ``shape``'s weight into factor shapes ``a ⊙ b`` (both larger than one
    entry; for a grouped convolution, those its groups allow) that the budget of ``budget``
    parameters and ``max_macs`` MACs (``None``: no limit) leaves at least one rank — and the
    smallest split, offered at rank 1 whatever the budget, so that the planner can say how
    far the model can shrink."""
    splits = [make_split(shape, a, budget, max_macs)
              for a, _ in factor_shapes(shape.weight_shape, shape.groups)]
    if not splits:
        return ()
    smallest = min(splits, key=lambda s: s.per_rank)
    return tuple(s._replace(cap=1) if s is smallest and s.cap < 1 else s
                 for s in splits if s.cap >= 1 or s is smallest)


# ----------------------------------------------------------------------------- spectra


def _short_side(m: Tensor) -> Tensor:
    return m if m.shape[0] <= m.shape[1] else m.T


def exact_energies(m: Tensor) -> Tensor:
    """All squared singular values of ``m``, largest first, in ``m``'s precision: the
    eigenvalues of the Gram matrix of its short side (about twice as fast as an SVD; in
    float32 the absolute error is ~1e-7 of the largest, far below the errors compared here)."""
    short = _short_side(m)
    return torch.linalg.eigvalsh(short @ short.T).flip(0).clamp_min(0)


def leading_energies(m: Tensor, count: int) -> Tensor:
    """The ``count`` largest squared singular values of ``m``, estimated from below: the
    Rayleigh–Ritz values of a randomized subspace (one power iteration), which never exceed
    the true ones (so the errors built from them are never optimistic). Deterministic."""
    short = _short_side(m)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(short.shape[1], count + _OVERSAMPLE, generator=generator,
                        dtype=short.dtype)
    basis = torch.linalg.qr(short @ probe).Q
    basis = torch.linalg.qr(short @ (short.T @ basis)).Q
    projected = basis.T @ short
    return torch.linalg.eigvalsh(projected @ projected.T).flip(0)[:count].clamp_min(0)


def tail_errors(
    weight: Tensor, a: tuple[int, ...], max_rank: int, total: float
) -> tuple[np.ndarray, bool]:
    """``(errors, exact)``: the relative error of the best rank-r GKPD for r = 1 … max_rank
    (float64), and whether they are exact (else estimates from above, from a randomized
    spectrum: where a few ranks are wanted from a large matrix). ``total`` is ``‖weight‖²``."""
    if total == 0.0:
        return np.zeros(max_rank), True
    return matrix_tail_errors(rearrange(weight, a).float(), max_rank, total)


def matrix_tail_errors(m: Tensor, max_rank: int, total: float) -> tuple[np.ndarray, bool]:
    """:func:`tail_errors` of an already rearranged matrix ``m`` (``total > 0``)."""
    side = min(m.shape)
    if side <= _EXACT_SIDE or 4 * (max_rank + _OVERSAMPLE) >= side:
        energies = exact_energies(m).double().numpy()
        # the tail summed from the smallest: exact down to the last ranks
        tails = np.cumsum(energies[::-1])[::-1]
        tails = np.append(tails, 0.0)[1 : max_rank + 1]
        return np.sqrt(np.clip(tails, 0.0, None) / total), True
    captured = np.cumsum(leading_energies(m, max_rank).double().numpy())
    return np.sqrt(np.clip(total - captured, 0.0, None) / total), False


def whitened_tail_errors(
    weight: Tensor, cov: Tensor, a: tuple[int, ...], max_rank: int, damping: float
) -> np.ndarray:
    """Relative output error of the best rank-r data-aware GKPD for r = 1 … max_rank, under
    the damped nearest-Kronecker approximation of the input covariance ``cov``
    (docs/design.md §8)."""
    from gkpd.whiten import WhitenedSplit

    b = tuple(w // x for w, x in zip(weight.shape, a, strict=True))
    split = WhitenedSplit.from_covariance(cov, weight.shape, a, b, damping=damping)
    m = split.whiten(rearrange(weight, a))
    total = float(m.double().square().sum())
    if total == 0.0:
        return np.zeros(max_rank)
    captured = np.cumsum(exact_energies(m)[:max_rank].double().numpy())
    return np.sqrt(np.clip(total - captured, 0.0, None) / total)
