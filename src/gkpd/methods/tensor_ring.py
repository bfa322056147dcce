"""``tensor_ring``: TR nets (Wang et al. 2018), conv and linear layers.

The weight is tensorized as for ``tensor_train`` (``(∏K, c_1·f_1, …, c_d·f_d)``, see
``_tensorized.py``) and written as a ring of cores ``G_k (r_k, n_k, r_{k+1})`` with
``r_m = r_0``: ``W[i] = trace(G_0[:, i_0, :] ⋯ G_{m-1}[:, i_{m-1}, :])``. Cores: TensorLy's
``tensor_ring`` (TR-SVD, PyTorch backend, float64), started on the largest mode. TR-SVD
splits that mode's rank into ``r_0·r_1``, so a uniform TR rank ``R`` needs ``R² ≤`` the
largest mode (and the product of the others); bonds that cannot carry ``R`` are narrowed as
TR-SVD narrows them. Candidates: every rank within the budget, with the error of its TR-SVD.
Per-layer override: ``{"rank": R}``.
"""

from __future__ import annotations

import math

import torch

from gkpd.methods._tensorized import Shapes, TensorizedLayer, TensorizedMethod
from gkpd.methods._tensorly import pytorch_backend


def _start(modes: list[int]) -> int:
    return modes.index(max(modes))


def tr_shapes(modes: list[int], rank: int) -> Shapes | None:
    """Core shapes of TR-SVD with uniform rank ``rank`` started on the largest mode
    (``None`` when ``rank² `` exceeds what that mode can split into)."""
    start = _start(modes)
    n = modes[start:] + modes[:start]
    m = len(n)
    if rank * rank > min(n[0], math.prod(n[1:])):
        return None
    r = [rank] * (m + 1)
    for k in range(1, m - 1):
        r[k + 1] = min(r[k] * n[k], math.prod(n[k + 1 :]) * r[0], r[k + 1])
    shapes = [(r[k], n[k], r[k + 1]) for k in range(m)]
    return shapes[-start:] + shapes[:-start] if start else shapes


class TensorRingLayer(TensorizedLayer):
    """A conv/linear layer whose weight is a tensor ring (``cores[k]: (r_k, n_k, r_{k+1})``,
    the last core closing the ring on the first)."""


class TensorRing(TensorizedMethod):
    name = "tensor_ring"
    layer_cls = TensorRingLayer

    def core_shapes(self, modes: list[int], rank: int) -> Shapes | None:
        return tr_shapes(modes, rank)

    def max_rank(self, modes: list[int]) -> int:
        start = _start(modes)
        others = math.prod(modes) // modes[start]
        return max(1, math.isqrt(min(modes[start], others)))

    def factorize(self, tensor: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
        with pytorch_backend(self.name):
            from tensorly.decomposition import tensor_ring

            rank = shapes[0][0]
            return list(tensor_ring(tensor, rank=rank, mode=_start(list(tensor.shape))).factors)
