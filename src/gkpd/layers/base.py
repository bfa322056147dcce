"""What the Kronecker conv and linear layers share: the factors, the stage order, the cost."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gkpd.counting import ORDERS
from gkpd.decompose import KroneckerFactors, kron_sum

# "weight": run the dense op with the reconstructed weight Σ_r a[r] ⊗ b[r] (cached at
# inference). As fast as the dense layer whatever the factor shapes, at the factors' size.
WEIGHT_PATH = "weight"
ORDER_CHOICES = ("auto", *ORDERS, WEIGHT_PATH)


class KroneckerLayer(nn.Module):
    """Base of the Kronecker layers: parameters ``a`` ``(R, *a_shape)`` and ``b``
    ``(R, *b_shape)``; subclasses give ``order_macs`` and ``resolve_order``."""

    a: nn.Parameter
    b: nn.Parameter
    _order: str = "auto"

    _weight_cache: tuple[tuple, Tensor] | None = None

    @property
    def order(self) -> str:
        """``"auto"`` (the cheaper order for each input size), ``"b_first"``, ``"a_first"``
        or ``"weight"`` (the dense op with the reconstructed weight)."""
        return self._order

    @order.setter
    def order(self, value: str) -> None:
        if value not in ORDER_CHOICES:
            raise ValueError(f"order {value!r} is not supported: expected one of {ORDER_CHOICES}")
        self._order = value

    def order_macs(self, input_shape: Sequence[int]) -> dict[str, int]:
        raise NotImplementedError

    def resolve_order(self, input_shape: Sequence[int]) -> str:
        raise NotImplementedError

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        """MACs of the dense op this layer replaces (what the ``"weight"`` path runs)."""
        raise NotImplementedError

    def macs(self, input_shape: Sequence[int]) -> int:
        """MACs of the forward that runs for an input of ``input_shape``."""
        order = self.resolve_order(input_shape)
        if order == WEIGHT_PATH:
            return self.dense_macs(input_shape)
        return self.order_macs(input_shape)[order]

    def reconstruct_weight(self) -> Tensor:
        """The dense weight ``Σ_r a[r] ⊗ b[r]``."""
        return kron_sum(self.a, self.b)

    def _path_weight(self) -> Tensor:
        """The weight the ``"weight"`` path runs with. At inference (eval mode, no grad, not
        being traced) it is rebuilt only when ``a`` or ``b`` changed; otherwise it is built
        on every call so gradients reach the factors."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._weight_cache = None
            return self.reconstruct_weight()
        a, b = self.a, self.b
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), a.dtype, a.device)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.reconstruct_weight())
        return self._weight_cache[1]

    def _copy_from(self, factors: KroneckerFactors, dense: nn.Module) -> None:
        """Take the factors of ``dense.weight`` and ``dense``'s bias (``from_dense``)."""
        with torch.no_grad():
            self.a.copy_(factors.a)
            self.b.copy_(factors.b)
            if dense.bias is not None:
                self.bias.copy_(dense.bias)

    def _copy_into(self, dense: nn.Module) -> nn.Module:
        """Give ``dense`` the reconstructed weight and this layer's bias (``to_dense``)."""
        with torch.no_grad():
            dense.weight.copy_(self.reconstruct_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense
