"""Recurrent layers whose gate weights are modules, so they can be planned and compressed.

``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` keep their weights as parameters (``weight_ih_l0``,
``weight_hh_l0``, ...) that one fused kernel reads, so none of them is ever called as a layer.
:class:`UnpackedLSTM`, :class:`UnpackedGRU` and :class:`UnpackedRNN` compute the same
function with, per layer and direction (:class:`RecurrentGates`, named ``l0``,
``l0_reverse``, ``l1``, ... after torch's parameter suffixes), an input-to-gates
``nn.Linear`` ``ih`` called once over all time steps, a hidden-to-gates ``nn.Linear`` ``hh``
called at every step and, for an LSTM with ``proj_size``, the projection ``hr`` (also called
at every step). A compression method can replace any of them; the gate nonlinearities stay.

Every linear is called with the batch as its first dimension (``ih`` on ``(N, T, in)``,
``hh`` on ``(N, hidden)``), so the planner's per-sample MACs are per sequence: ``ih`` counts
its ``T`` steps in its input shape, ``hh`` and ``hr`` in their number of calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from gkpd.layers.base import fx_leaf_call, refuse_script
from gkpd.layers.gates import (
    TorchGates,
    check_nonlinearity,
    gru_update,
    lstm_update,
    rnn_update,
)

__all__ = ["RecurrentGates", "UnpackedGRU", "UnpackedLSTM", "UnpackedRNN", "UnpackedRecurrent"]


class RecurrentGates(nn.Module):
    """The linear layers of one layer and direction: ``ih`` (input to gates), ``hh``
    (hidden state to gates) and, for a projected LSTM, ``hr`` (cell output to hidden
    state). The recurrence that calls them is its parent's."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, bias: bool,
                 proj_size: int, factory: dict) -> None:
        super().__init__()
        state = proj_size or hidden_size
        self.ih = nn.Linear(input_size, gates * hidden_size, bias=bias, **factory)
        self.hh = nn.Linear(state, gates * hidden_size, bias=bias, **factory)
        self.hr = nn.Linear(hidden_size, proj_size, bias=False, **factory) if proj_size else None


def _check_size(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class UnpackedRecurrent(TorchGates, nn.Module):
    """What the unpacked LSTM, GRU and RNN share: the options of ``nn.RNNBase``, the gate
    layers, the loop over layers, directions and time steps, conversion from and to torch's
    module. A subclass gives ``torch_type``, ``gates`` (per hidden unit) and ``_step``."""

    torch_type: type[nn.RNNBase]
    gates: int
    # the keyword arguments of torch_type, attributes of it and of this module alike
    option_names: tuple[str, ...] = ("num_layers", "bias", "batch_first", "dropout",
                                     "bidirectional")

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None,
                 dtype=None) -> None:
        super().__init__()
        _check_size("input_size", input_size, 1)
        _check_size("hidden_size", hidden_size, 1)
        _check_size("num_layers", num_layers, 1)
        _check_size("proj_size", proj_size, 0)
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size must be smaller than hidden_size={hidden_size}, "
                             f"got {proj_size}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (
                0 <= dropout <= 1):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        factory = {"device": device, "dtype": dtype}
        out = (proj_size or hidden_size) * self.directions
        for layer in range(num_layers):
            for suffix in self._suffixes(layer):
                self.add_module(suffix, RecurrentGates(
                    input_size if layer == 0 else out, hidden_size, self.gates, bias,
                    proj_size, factory,
                ))

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self, layer: int) -> list[str]:
        """The names of a layer's gates, as torch's parameter suffixes: ``l0``,
        ``l0_reverse``."""
        return [f"l{layer}", f"l{layer}_reverse"][: self.directions]

    # ------------------------------------------------------------------ torch's module
    # from_torch, to_torch, to_dense: TorchGates, over these layers

    def gate_layers(self) -> dict[str, nn.Module]:
        return {f"{name}_{suffix}": layer for suffix, gates in self._gates()
                for name, layer in gates.named_children()}

    def _gates(self) -> list[tuple[str, RecurrentGates]]:
        """``(suffix, gates)`` per layer and direction, in torch's order."""
        return [(s, getattr(self, s)) for layer in range(self.num_layers)
                for s in self._suffixes(layer)]

    def flatten_parameters(self) -> None:
        """Nothing to do (as ``nn.RNNBase.flatten_parameters`` off cuDNN): kept so that code
        calling it on an ``nn.LSTM`` runs unchanged."""

    # ------------------------------------------------------------------ forward

    def forward(self, input: Tensor | PackedSequence, hx=None):
        if isinstance(input, torch.fx.Proxy):
            return fx_leaf_call(self, input, hx)
        lengths = None
        if isinstance(input, PackedSequence):
            x, lengths = pad_packed_sequence(input, batch_first=True)
            batched = True
        else:
            x, batched = self._batch_first(input)
        states = self._initial_states(hx, x, batched)
        layer_input, finals = x, []
        for layer in range(self.num_layers):
            outputs = []
            for direction, suffix in enumerate(self._suffixes(layer)):
                index = layer * self.directions + direction
                output, final = self._run(getattr(self, suffix), layer_input,
                                          [s[index] for s in states], direction == 1, lengths)
                outputs.append(output)
                finals.append(final)
            layer_input = torch.cat(outputs, -1) if len(outputs) > 1 else outputs[0]
            if self.training and self.dropout and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        final_states = [torch.stack(parts) for parts in zip(*finals, strict=True)]
        if not batched:
            layer_input, final_states = layer_input[0], [s[:, 0] for s in final_states]
        if lengths is not None:
            output = _repacked(layer_input, lengths, input)
        elif self.batch_first or not batched:
            output = layer_input
        else:
            output = layer_input.transpose(0, 1).contiguous()
        return output, self._hidden_result(final_states)

    def _batch_first(self, input: Tensor) -> tuple[Tensor, bool]:
        """The input as ``(N, T, input_size)``, and whether it had a batch dimension."""
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a Tensor or PackedSequence, got "
                            f"{type(input).__name__}")
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"input must have shape (L, N, {self.input_size}), (N, L, {self.input_size}) "
                f"with batch_first, or (L, {self.input_size}) unbatched; got {tuple(input.shape)}"
            )
        batched = input.dim() == 3
        x = input if self.batch_first or not batched else input.transpose(0, 1)
        x = x if batched else x.unsqueeze(0)
        if x.shape[1] == 0:
            raise ValueError(f"input has no time steps: shape {tuple(input.shape)}")
        return x, batched

    def _initial_states(self, hx, x: Tensor, batched: bool) -> list[Tensor]:
        """The initial states (``h`` and, for an LSTM, ``c``), each ``(layers·directions, N,
        size)``: those given in ``hx`` or zeros."""
        sizes = self._state_sizes()
        count, batch = self.num_layers * self.directions, x.shape[0]
        if hx is None:
            return [x.new_zeros(count, batch, size) for size in sizes]
        given = self._hidden_parts(hx)
        states = []
        for part, size, name in zip(given, sizes, ("h_0", "c_0"), strict=False):
            expected = (count, batch, size) if batched else (count, size)
            if not isinstance(part, Tensor) or tuple(part.shape) != expected:
                shape = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
                raise ValueError(f"hx: {name} must have shape {expected}, got {shape}")
            states.append(part if batched else part.unsqueeze(1))
        return states

    def _run(self, gates: RecurrentGates, x: Tensor, state: list[Tensor], reverse: bool,
             lengths: Tensor | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One layer in one direction over ``x`` ``(N, T, in)``: its outputs ``(N, T, out)``
        and final states. With ``lengths`` (a packed input), a sequence's state stops at its
        end (a reverse pass starts there) and its outputs past the end are zero."""
        steps = x.shape[1]
        from_input = gates.ih(x)  # one call over all time steps
        outputs: list[Tensor | None] = [None] * steps
        state = tuple(state)
        if lengths is not None:
            lengths = lengths.to(x.device).unsqueeze(1)
        for t in (reversed(range(steps)) if reverse else range(steps)):
            new = self._step(gates, from_input[:, t], state)
            if lengths is not None:
                running = t < lengths
                new = tuple(torch.where(running, n, s) for n, s in zip(new, state, strict=True))
                outputs[t] = new[0] * running
            else:
                outputs[t] = new[0]
            state = new
        return torch.stack(outputs, 1), state

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size,)

    def _hidden_parts(self, hx) -> tuple:
        return (hx,)

    def _hidden_result(self, states: list[Tensor]):
        return states[0]

    def _step(self, gates: RecurrentGates, from_input: Tensor,
              state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """The states after one time step, from the input's part of the gates ``(N,
        gates·hidden)`` and the states before it."""
        raise NotImplementedError

    def __prepare_scriptable__(self):
        refuse_script(self, "its forward loops over time steps in Python")

    def extra_repr(self) -> str:
        defaults = {"num_layers": 1, "bias": True, "batch_first": False, "dropout": 0.0,
                    "bidirectional": False, "proj_size": 0, "nonlinearity": "tanh"}
        options = [f"{k}={v!r}" for k, v in self._options(self).items() if defaults[k] != v]
        return ", ".join([str(self.input_size), str(self.hidden_size), *options])


def _repacked(output: Tensor, lengths: Tensor, packed: PackedSequence) -> PackedSequence:
    """``output`` ``(N, T, size)``, in the order of ``packed``'s sequences, packed as
    ``packed`` is (the same batch sizes and sorting)."""
    order = packed.sorted_indices
    if order is not None:
        output, lengths = output[order], lengths[order.cpu()]
    data = pack_padded_sequence(output, lengths, batch_first=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                          packed.unsorted_indices)


class UnpackedLSTM(UnpackedRecurrent):
    """``nn.LSTM`` with its gate weights as called ``nn.Linear`` modules (see the module
    docs). Same arguments, forward signature and outputs as ``nn.LSTM`` (``num_layers``,
    ``bias``, ``batch_first``, ``dropout`` between layers in training, ``bidirectional``,
    ``proj_size``, unbatched and packed inputs, a given ``(h_0, c_0)``); :meth:`from_torch`
    converts one exactly, :meth:`to_torch` back."""

    torch_type = nn.LSTM
    gates = 4  # input, forget, cell, output: torch's order
    option_names = (*UnpackedRecurrent.option_names, "proj_size")

    def _state_sizes(self) -> tuple[int, ...]:
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _hidden_parts(self, hx) -> tuple:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError(f"hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        return tuple(hx)

    def _hidden_result(self, states: list[Tensor]):
        return states[0], states[1]

    def _step(self, gates, from_input, state):
        h, c = lstm_update(from_input + gates.hh(state[0]), state[1])
        return (h if gates.hr is None else gates.hr(h)), c


class UnpackedGRU(UnpackedRecurrent):
    """``nn.GRU`` with its gate weights as called ``nn.Linear`` modules; as
    :class:`UnpackedLSTM`, without ``proj_size``."""

    torch_type = nn.GRU
    gates = 3  # reset, update, new: torch's order

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None) -> None:
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)

    def _step(self, gates, from_input, state):
        (h,) = state
        return (gru_update(from_input, gates.hh(h), h),)


class UnpackedRNN(UnpackedRecurrent):
    """``nn.RNN`` (``tanh`` or ``relu``) with its weights as called ``nn.Linear`` modules; as
    :class:`UnpackedGRU`, with ``nonlinearity``."""

    torch_type = nn.RNN
    gates = 1
    option_names = ("nonlinearity", *UnpackedRecurrent.option_names)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None,
                 dtype=None) -> None:
        check_nonlinearity(nonlinearity)
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def _step(self, gates, from_input, state):
        return (rnn_update(from_input + gates.hh(state[0]), self.nonlinearity),)


UNPACKED_RECURRENT: dict[type[nn.Module], type[UnpackedRecurrent]] = {
    nn.LSTM: UnpackedLSTM, nn.GRU: UnpackedGRU, nn.RNN: UnpackedRNN,
}
