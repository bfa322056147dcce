"""Kronecker linear layer: ``y = Σ_r A_r X B_rᵀ`` on the input viewed as ``(N, in1, in2)``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkpd.counting import ORDERS, best_order, kronecker_linear_order_macs
from gkpd.decompose import as_shape, b_shape_for, check_rank
from gkpd.layers.base import (
    WEIGHT_PATH,
    KroneckerLayer,
    Steps,
    check_sizes,
    dense_factors,
)
from gkpd.layers.conv import check_dtype, uniform_factor_bound

__all__ = ["KroneckerLinear"]


def _left_matmul(w: Tensor, x: Tensor) -> Tensor:
    """``w @ x`` for a matrix ``w (m, k)`` and a batch ``x (N, k, n)``. With ``n == 1`` as one
    matrix product over the batch: torch's ``matmul`` ran it as N matrix-vector products
    (``bmm`` on the expanded ``w``), 182 ms against 19 on MiniLM's A (2, 384) layer at 1024
    tokens. With ``n > 1`` torch's batched product stays: folding the batch would copy ``x``
    transposed, which ran 1.6-2x slower on (16, 24) and (8, 64) splits (1 thread)."""
    n, k, columns = x.shape
    if columns != 1:
        return w @ x
    return (x.reshape(n, k) @ w.t()).unsqueeze(-1)


class KroneckerLinear(KroneckerLayer):
    """``nn.Linear`` whose weight ``(out_features, in_features)`` is ``Σ_r a[r] ⊗ b[r]``.

    ``a_shape = (O1, I1)``; ``b_shape = (out_features/O1, in_features/I1)``. Accepts any
    number of leading dims, like ``nn.Linear``. ``path`` is ``"auto"``, ``"b_first"``,
    ``"a_first"`` or ``"weight"``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        a_shape: Sequence[int],
        rank: int | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes(in_features=in_features, out_features=out_features)
        check_dtype(dtype)
        a = as_shape("a_shape", a_shape)
        self.in_features = in_features
        self.out_features = out_features
        self.a_shape = a
        self.b_shape = b_shape_for((out_features, in_features), a)
        self.rank = check_rank(rank, self.a_shape, self.b_shape)
        self._path = "auto"
        factory = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(self.rank, *self.a_shape, **factory))
        self.b = nn.Parameter(torch.empty(self.rank, *self.b_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Init so the reconstructed weight has the variance of ``nn.Linear``'s default."""
        bound = uniform_factor_bound(self.in_features, self.rank)
        nn.init.uniform_(self.a, -bound, bound)
        nn.init.uniform_(self.b, -bound, bound)
        if self.bias is not None:
            b = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -b, b)

    @classmethod
    def from_dense(
        cls, module: nn.Module, *, a_shape: Sequence[int], rank: int | None = None,
        input_covariance: Tensor | None = None, damping: float | None = None,
    ) -> KroneckerLinear:
        """The GKPD of ``module.weight`` (optimal for ``rank``; exact for ``rank=None``).

        With ``input_covariance`` (``E[x xᵀ]`` of the layer's inputs, ``(in, in)``) the factors
        minimise the output error on such inputs instead (:func:`gkpd.whiten.decompose_whitened`,
        damped by ``damping``, default 0.01)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear, got {type(module).__name__}")
        weight = module.weight
        if not weight.is_floating_point():
            raise TypeError(f"module.weight must have a floating dtype, got {weight.dtype}")
        factors = dense_factors(weight, a_shape, rank, input_covariance, damping)
        layer = cls(
            module.in_features, module.out_features, module.bias is not None,
            a_shape=a_shape, rank=factors.rank, device=weight.device, dtype=weight.dtype,
        )
        layer._copy_from(factors, module)
        return layer

    def to_dense(self) -> nn.Linear:
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None,
            device=self.a.device, dtype=self.a.dtype,
        )
        return self._copy_into(linear)

    def order_macs(self, input_shape: Sequence[int]) -> dict[str, int]:
        batch = math.prod(int(s) for s in input_shape[:-1])
        return kronecker_linear_order_macs(self.a_shape, self.b_shape, self.rank, batch)

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        return math.prod(int(s) for s in input_shape[:-1]) * self.in_features * self.out_features

    def resolve_path(self, input_shape: Sequence[int] = (1, 1)) -> str:
        if self._path != "auto":
            return self._path
        return best_order(self.order_macs((1, self.in_features)))

    def _run(self, x: Tensor, step: Steps) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has shape {tuple(x.shape)}, expected last dim in_features="
                f"{self.in_features}"
            )
        # no elements: the reshapes cannot infer a size from none; the dense op can
        path = WEIGHT_PATH if x.numel() == 0 else self.resolve_path()
        bias = self.bias
        if path == WEIGHT_PATH:
            weight = self._path_weight()
            return step(x, lambda t: F.linear(t, weight, bias))
        r = self.rank
        (o1, i1), (o2, i2) = self.a_shape, self.b_shape
        lead = x.shape[:-1]
        if self._path in ORDERS:  # forced; auto's fewer MACs bound the tensor between stages
            self._refuse_oversized(path, x, lambda: math.prod(lead) * r * (
                i1 * o2 if path == "b_first" else o1 * i2))
        if path == "b_first":
            wb = self.b.reshape(r * o2, i2).t()
            wa = self.a.permute(1, 2, 0).reshape(o1, i1 * r)
            # (N, I1, R·O2) = (N, I1·R, O2), then A
            y = step(x, lambda t: _left_matmul(wa, (t.reshape(-1, i1, i2) @ wb)
                                               .reshape(-1, i1 * r, o2)))
        else:
            wa = self.a.transpose(0, 1).reshape(o1 * r, i1)
            wb = self.b.transpose(1, 2).reshape(r * i2, o2)
            # (N, O1·R, I2), then B
            y = step(x, lambda t: _left_matmul(wa, t.reshape(-1, i1, i2))
                     .reshape(-1, o1, r * i2) @ wb)
        y = step(y, lambda t: t.reshape(*lead, o1 * o2))
        if bias is not None:
            # in place: a new output-sized tensor cost a quarter of the time
            y = step(y, lambda t: t.add_(bias))
        return y

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.bias is None:
            s += ", bias=False"
        s += f", a_shape={self.a_shape}, b_shape={self.b_shape}, rank={self.rank}"
        if self._path != "auto":
            s += f", path={self._path!r}"
        return s
