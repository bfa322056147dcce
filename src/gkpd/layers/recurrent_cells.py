"""Recurrent cells whose gate weights are modules, so they can be planned and compressed.

``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell`` keep ``weight_ih`` and ``weight_hh`` as
parameters of their own, as the sequence layers do (:mod:`gkpd.layers.recurrent`). One step
of the user's own loop calls the cell; :class:`UnpackedLSTMCell`, :class:`UnpackedGRUCell` and
:class:`UnpackedRNNCell` compute the same step with two called ``nn.Linear`` modules, ``ih``
(input to gates) and ``hh`` (hidden state to gates), with the gate arithmetic of the sequence
layers. The planner counts each call (the per-sample MACs of a cell called at ``T`` steps
are ``T`` times one step's), so a compression method can replace ``ih`` and ``hh``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from gkpd.layers.base import check_sizes, fx_leaf_call, refuse_script
from gkpd.layers.gates import TorchGates, check_nonlinearity, gru_update, lstm_update, rnn_update

__all__ = ["UNPACKED_CELLS", "UnpackedCell", "UnpackedGRUCell", "UnpackedLSTMCell",
           "UnpackedRNNCell"]


class UnpackedCell(TorchGates, nn.Module):
    """What the unpacked cells share: the gate layers ``ih`` and ``hh``, the input and state
    checks of torch's cells (a batch ``(N, input_size)`` or one input ``(input_size,)``),
    conversion from and to torch's module. A subclass gives ``torch_type``, ``gates`` (per
    hidden unit) and ``_update``."""

    torch_type: ClassVar[type[nn.RNNCellBase]]
    gates: ClassVar[int]
    state_names: ClassVar[tuple[str, ...]] = ("hx",)
    # the keyword arguments of torch_type besides the sizes, attributes of it and of this one
    option_names: ClassVar[tuple[str, ...]] = ("bias",)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        check_sizes(input_size=input_size, hidden_size=hidden_size)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        factory = {"device": device, "dtype": dtype}
        self.ih = nn.Linear(input_size, self.gates * hidden_size, bias=bias, **factory)
        self.hh = nn.Linear(hidden_size, self.gates * hidden_size, bias=bias, **factory)

    def gate_layers(self) -> dict[str, nn.Module]:  # for TorchGates' conversions
        return {"ih": self.ih, "hh": self.hh}

    def forward(self, input: Tensor, hx=None):
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf_call(self, input, hx)
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(f"input must have shape (N, {self.input_size}) or "
                             f"({self.input_size},), got {tuple(input.shape)}")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        states = self._states(hx, x, batched)
        new = self._update(self.ih(x), states)
        new = new if batched else tuple(s[0] for s in new)
        return new if len(self.state_names) > 1 else new[0]

    def _states(self, hx, x: Tensor, batched: bool) -> tuple[Tensor, ...]:
        """The states before the step, each ``(N, hidden_size)``: those in ``hx`` or zeros."""
        if hx is None:
            return tuple(x.new_zeros(x.shape[0], self.hidden_size) for _ in self.state_names)
        parts = self._hidden_parts(hx)
        expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        for part, name in zip(parts, self.state_names, strict=True):
            if not isinstance(part, Tensor) or tuple(part.shape) != expected:
                shape = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(f"hx: {name} must have shape {expected}, got {shape}")
        return tuple(p if batched else p.unsqueeze(0) for p in parts)

    def _hidden_parts(self, hx) -> tuple:
        return (hx,)

    def _update(self, from_input: Tensor, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The states after the step, from the input's part of the gates ``(N,
        gates·hidden)`` and the states before it."""
        raise NotImplementedError

    def __prepare_scriptable__(self):
        refuse_script(self, "its forward takes a state of either form (given or None)")

    def extra_repr(self) -> str:
        options = [f"{k}={v!r}" for k, v in self._options(self).items()
                   if v != {"bias": True, "nonlinearity": "tanh"}[k]]
        return ", ".join([str(self.input_size), str(self.hidden_size), *options])


class UnpackedLSTMCell(UnpackedCell):
    """``nn.LSTMCell`` with its gate weights as called ``nn.Linear`` modules ``ih`` and ``hh``:
    same arguments, forward signature (``hx`` a tuple ``(h, c)`` or ``None``) and outputs
    (``(h', c')``)."""

    torch_type = nn.LSTMCell
    gates = 4
    state_names = ("h", "c")

    def _hidden_parts(self, hx) -> tuple:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be a tuple (h, c), got {type(hx).__name__}")
        return tuple(hx)

    def _update(self, from_input, states):
        h, c = states
        return lstm_update(from_input + self.hh(h), c)


class UnpackedGRUCell(UnpackedCell):
    """``nn.GRUCell`` with its gate weights as called ``nn.Linear`` modules; as
    :class:`UnpackedLSTMCell`, ``hx`` and the output a tensor ``h``."""

    torch_type = nn.GRUCell
    gates = 3

    def _update(self, from_input, states):
        (h,) = states
        return (gru_update(from_input, self.hh(h), h),)


class UnpackedRNNCell(UnpackedCell):
    """``nn.RNNCell`` (``tanh`` or ``relu``) with its weights as called ``nn.Linear`` modules;
    as :class:`UnpackedGRUCell`, with ``nonlinearity``."""

    torch_type = nn.RNNCell
    gates = 1
    option_names = ("bias", "nonlinearity")

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", device=None, dtype=None) -> None:
        check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def _update(self, from_input, states):
        return (rnn_update(from_input + self.hh(states[0]), self.nonlinearity),)


UNPACKED_CELLS: dict[type[nn.Module], type[UnpackedCell]] = {
    nn.LSTMCell: UnpackedLSTMCell, nn.GRUCell: UnpackedGRUCell, nn.RNNCell: UnpackedRNNCell,
}
