"""``tensor_train``: TT-conv (Garipov et al. 2016) and TT-FC (Novikov et al. 2015) layers.

The weight is tensorized as ``(∏K, c_1·f_1, …, c_d·f_d)`` (see ``_tensorized.py``) and
written as a train of cores ``G_k (r_k, n_k, r_{k+1})`` with ``r_0 = r_m = 1``. One uniform
TT rank ``R`` sets every inner bond to ``min(R, ∏ n_{<k}, ∏ n_{≥k})`` (no bond can carry more).
Cores: TensorLy's ``tensor_train`` (TT-SVD, PyTorch backend, float64), optimal per bond up to
``√(m-1)``. Candidates: every rank within the budget, with the error of its TT-SVD.
Per-layer override: ``{"rank": R}``.
"""

from __future__ import annotations

import math

import torch

from gkpd.methods._tensorized import Shapes, TensorizedLayer, TensorizedMethod
from gkpd.methods._tensorly import pytorch_backend


def tt_ranks(modes: list[int], rank: int) -> list[int]:
    """Bond ranks ``[1, r_1, …, r_{m-1}, 1]`` of a train of uniform rank ``rank``."""
    inner = [min(rank, math.prod(modes[:k]), math.prod(modes[k:])) for k in range(1, len(modes))]
    return [1, *inner, 1]


class TensorTrainLayer(TensorizedLayer):
    """A conv/linear layer whose weight is a tensor train (``cores[k]: (r_k, n_k, r_{k+1})``)."""


class TensorTrain(TensorizedMethod):
    name = "tensor_train"
    layer_cls = TensorTrainLayer

    def core_shapes(self, modes: list[int], rank: int) -> Shapes:
        r = tt_ranks(modes, rank)
        return [(r[k], n, r[k + 1]) for k, n in enumerate(modes)]

    def max_rank(self, modes: list[int]) -> int:
        return max(tt_ranks(modes, math.prod(modes))[1:-1], default=1)

    def factorize(self, tensor: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
        with pytorch_backend(self.name):
            from tensorly.decomposition import tensor_train

            ranks = [s[0] for s in shapes] + [1]
            return list(tensor_train(tensor, rank=ranks).factors)
