"""Kronecker embedding: ``nn.Embedding`` whose table is ``Σ_r A_r ⊗ B_r``, looked up row by row.

With ``A_r: (N1, D1)`` and ``B_r: (N2, D2)``, row ``i`` of ``A_r ⊗ B_r`` is
``kron(A_r[i // N2], B_r[i % N2])``, so a lookup gathers one row of each factor per token and
sums ``R`` outer products of ``D1`` and ``D2`` entries: ``R·D`` multiply-adds per token (what
:meth:`KroneckerEmbedding.macs` counts; a dense lookup counts none), and the full table is
never formed (docs/design.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkpd.decompose import as_shape, b_shape_for, check_rank, decompose, kron_sum
from gkpd.layers.base import ReconstructedWeight, check_sizes, fx_leaf_call, refuse_script
from gkpd.layers.conv import check_dtype

__all__ = ["KroneckerEmbedding", "unsupported_embedding_settings"]


def unsupported_embedding_settings(
    max_norm: float | None, scale_grad_by_freq: bool, sparse: bool
) -> str | None:
    """Why a KroneckerEmbedding cannot take these ``nn.Embedding`` settings (``None``: it can).

    ``max_norm`` renormalises the looked-up rows of the table in place, and the rows of a sum
    of Kronecker products share their factors; ``scale_grad_by_freq`` and ``sparse`` shape
    the gradient of table rows, which the factors do not have."""
    if max_norm is not None:
        return (
            f"max_norm={max_norm} renormalises looked-up rows of the table in place, which a "
            "sum of Kronecker products (rows sharing their factors) cannot do"
        )
    if scale_grad_by_freq:
        return "scale_grad_by_freq=True scales the gradient of table rows, which the factors lack"
    if sparse:
        return "sparse=True gives sparse gradients of table rows; the factors are dense"
    return None


class KroneckerEmbedding(ReconstructedWeight, nn.Module):
    """``nn.Embedding`` whose weight ``(num_embeddings, embedding_dim)`` is ``Σ_r a[r] ⊗ b[r]``.

    ``a_shape = (N1, D1)``; ``b_shape = (num_embeddings/N1, embedding_dim/D1)``; ``rank``:
    ``None`` for full Kronecker rank (exact). ``padding_idx`` behaves as in ``nn.Embedding``:
    its row is a fixed vector (the dense layer's row, zeros when built fresh) that receives no
    gradient, kept in the buffer ``padding_row``. ``max_norm``, ``scale_grad_by_freq`` and
    ``sparse`` are refused (:func:`unsupported_embedding_settings` says why).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        a_shape: Sequence[int],
        rank: int | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(num_embeddings=num_embeddings, embedding_dim=embedding_dim)
        reason = unsupported_embedding_settings(max_norm, scale_grad_by_freq, sparse)
        if reason:
            raise ValueError(f"KroneckerEmbedding does not support {reason}")
        check_dtype(dtype)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = _padding_index(padding_idx, num_embeddings)
        self.max_norm, self.norm_type = None, norm_type
        self.scale_grad_by_freq, self.sparse = False, False
        self.a_shape = as_shape("a_shape", a_shape)
        self.b_shape = b_shape_for((num_embeddings, embedding_dim), self.a_shape)
        self.rank = check_rank(rank, self.a_shape, self.b_shape)
        factory = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(self.rank, *self.a_shape, **factory))
        self.b = nn.Parameter(torch.empty(self.rank, *self.b_shape, **factory))
        if self.padding_idx is not None:
            self.register_buffer("padding_row", torch.zeros(embedding_dim, **factory))
        else:
            self.padding_row = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init so the table's entries have ``nn.Embedding``'s variance 1 (``R·Var(a)·Var(b)``);
        the padding row is zeros, as ``nn.Embedding`` makes it."""
        std = self.rank ** -0.25
        nn.init.normal_(self.a, 0.0, std)
        nn.init.normal_(self.b, 0.0, std)
        if self.padding_row is not None:
            nn.init.zeros_(self.padding_row)

    @classmethod
    def from_dense(
        cls, embedding: nn.Module, *, a_shape: Sequence[int], rank: int | None = None
    ) -> KroneckerEmbedding:
        """The GKPD of ``embedding.weight`` (optimal for ``rank``; exact for ``rank=None``), with
        its padding index and padding row."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"embedding must be an nn.Embedding, got {type(embedding).__name__}")
        weight = embedding.weight
        if not weight.is_floating_point():
            raise TypeError(f"embedding.weight must have a floating dtype, got {weight.dtype}")
        factors = decompose(weight.detach(), a_shape, rank=rank)
        layer = cls(
            embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
            embedding.max_norm, embedding.norm_type, embedding.scale_grad_by_freq,
            embedding.sparse, a_shape=a_shape, rank=factors.rank, device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.a.copy_(factors.a)
            layer.b.copy_(factors.b)
            if layer.padding_row is not None:
                layer.padding_row.copy_(weight[layer.padding_idx])
        return layer

    def reconstruct_weight(self) -> Tensor:
        """The table the lookup reads: ``Σ_r a[r] ⊗ b[r]``, with the padding row in place."""
        weight = kron_sum(self.a, self.b)
        if self.padding_row is None:
            return weight
        rows = torch.arange(self.num_embeddings, device=weight.device)[:, None]
        return torch.where(rows == self.padding_idx, self.padding_row, weight)

    def to_dense(self) -> nn.Embedding:
        dense = nn.Embedding(
            self.num_embeddings, self.embedding_dim, self.padding_idx, norm_type=self.norm_type,
            device=self.a.device, dtype=self.a.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.reconstruct_weight())
        return dense

    def macs(self, input_shape: Sequence[int]) -> int:
        """Multiply-adds of a lookup of ``input_shape`` token ids: ``R·D`` per token."""
        return math.prod(int(s) for s in input_shape) * self.rank * self.embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        if isinstance(ids, torch.fx.Proxy):  # one call in a symbolic trace, as nn.Embedding
            return fx_leaf_call(self, ids)
        r = self.rank
        (_, d1), (n2, d2) = self.a_shape, self.b_shape
        flat = ids.reshape(-1)
        # rows of every A_r (and B_r) side by side: one gather per factor
        rows_a = F.embedding(flat // n2, self.a.permute(1, 0, 2).reshape(-1, r * d1))
        rows_b = F.embedding(flat % n2, self.b.permute(1, 0, 2).reshape(-1, r * d2))
        out = rows_a.reshape(-1, r, d1).transpose(1, 2) @ rows_b.reshape(-1, r, d2)
        out = out.reshape(*ids.shape, d1 * d2)
        if self.padding_row is not None:  # a fixed row: no gradient reaches the factors
            out = torch.where((ids == self.padding_idx)[..., None], self.padding_row, out)
        return out

    def __prepare_scriptable__(self):
        refuse_script(self, "its forward takes a symbolic-trace path in Python")

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s + f", a_shape={self.a_shape}, b_shape={self.b_shape}, rank={self.rank}"


def _padding_index(padding_idx: int | None, num_embeddings: int) -> int | None:
    """``padding_idx`` as ``nn.Embedding`` takes it (negative counts from the end)."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, int) or not (
        -num_embeddings <= padding_idx < num_embeddings
    ):
        raise ValueError(
            f"padding_idx must be an int in [-{num_embeddings}, {num_embeddings}), "
            f"got {padding_idx!r}"
        )
    return padding_idx % num_embeddings
