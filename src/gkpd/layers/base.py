"""What the Kronecker conv and linear layers share: the factors, the stage order, the cost."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gkpd.counting import ORDERS
from gkpd.decompose import KroneckerFactors, kron_sum

ORDER_CHOICES = ("auto", *ORDERS)


class KroneckerLayer(nn.Module):
    """Base of the Kronecker layers: parameters ``a`` ``(R, *a_shape)`` and ``b``
    ``(R, *b_shape)``; subclasses give ``order_macs`` and ``resolve_order``."""

    a: nn.Parameter
    b: nn.Parameter
    _order: str = "auto"

    @property
    def order(self) -> str:
        """``"auto"`` (the cheaper order for each input size), ``"b_first"`` or ``"a_first"``."""
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

    def macs(self, input_shape: Sequence[int]) -> int:
        """MACs of the forward that runs for an input of ``input_shape``."""
        return self.order_macs(input_shape)[self.resolve_order(input_shape)]

    def reconstruct_weight(self) -> Tensor:
        """The dense weight ``Σ_r a[r] ⊗ b[r]``."""
        return kron_sum(self.a, self.b)

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
