"""What the recurrent layers (:mod:`gkpd.layers.recurrent`) and cells
(:mod:`gkpd.layers.recurrent_cells`) share: the gate arithmetic of one step, in torch's gate
order and formulas (the ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` docs), and the copies between
torch's ``weight_<gate>_<suffix>`` parameters and the gate layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gkpd.state_dicts import copy_parameter

__all__ = ["TorchGates", "check_nonlinearity", "copy_from_torch", "copy_to_torch",
           "dense_linear", "gru_update", "lstm_update", "rnn_update"]


class TorchGates:
    """Conversion from and to torch's module, for an unpacked recurrent layer or cell (a
    mixin before ``nn.Module``). The class gives ``torch_type``, ``option_names`` (its keyword
    arguments besides the sizes, attributes of torch's module and of this one alike),
    ``input_size``, ``hidden_size`` and :meth:`gate_layers`."""

    torch_type: type[nn.Module]
    option_names: tuple[str, ...]

    def gate_layers(self) -> dict[str, nn.Module]:
        """The gate layers by the suffix of torch's parameters (``ih_l0``, ``hh``, ...)."""
        raise NotImplementedError

    @classmethod
    def _options(cls, module: nn.Module) -> dict:
        """The keyword arguments besides the sizes that build a module like ``module``
        (torch's or this one)."""
        return {name: getattr(module, name) for name in cls.option_names}

    @classmethod
    def from_torch(cls, module: nn.Module):
        """The same layer as ``module`` (its weights copied), in its train/eval mode."""
        if not isinstance(module, cls.torch_type):
            raise TypeError(f"module must be an {cls.torch_type.__name__}, got "
                            f"{type(module).__name__}")
        reference = next(module.parameters())
        new = cls(module.input_size, module.hidden_size, **cls._options(module),
                  device=reference.device, dtype=reference.dtype)
        copy_from_torch(module, new.gate_layers())
        return new.train(module.training)

    def to_dense(self) -> nn.Module:
        """The ``torch_type`` module computing the same function (what
        :func:`gkpd.export.merge` puts in its place), its gate layers made dense where they
        are Kronecker layers; this module itself where a gate layer has no dense form (the
        svd baseline's two linears, which merge leaves as they are)."""
        layers = {key: dense_linear(m) for key, m in self.gate_layers().items()}
        if any(linear is None for linear in layers.values()):
            return self
        reference = next(iter(layers.values())).weight
        module = self.torch_type(self.input_size, self.hidden_size, **self._options(self),
                                 device=reference.device, dtype=reference.dtype)
        return copy_to_torch(layers, module).train(self.training)

    def to_torch(self) -> nn.Module:
        """As :meth:`to_dense`; ``TypeError`` when a gate layer has no dense form."""
        dense = self.to_dense()
        if dense is self:
            kinds = sorted({type(m).__name__ for m in self.gate_layers().values()
                            if dense_linear(m) is None})
            raise TypeError(f"{type(self).__name__}.to_torch() needs gate layers with a dense "
                            f"form (nn.Linear or a Kronecker layer), got {', '.join(kinds)}")
        return dense


def dense_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear``: itself, or what its ``to_dense()`` gives (a Kronecker
    layer's); ``None`` when it has no dense form (svd's two linears)."""
    if type(module) is nn.Linear:
        return module
    to_dense = getattr(module, "to_dense", None)
    dense = to_dense() if callable(to_dense) else None
    return dense if type(dense) is nn.Linear else None


def copy_from_torch(module: nn.Module, layers: dict[str, nn.Linear]) -> None:
    """Copy torch's ``weight_<key>`` and ``bias_<key>`` parameters of ``module`` into the
    linear layer of each key of ``layers`` (``ih_l0``, ``hh``, ...), with their
    ``requires_grad``."""
    for key, target in layers.items():
        for kind in ("weight", "bias"):
            source = getattr(module, f"{kind}_{key}", None)
            if source is not None:
                copy_parameter(getattr(target, kind), source)


def copy_to_torch(layers: dict[str, nn.Linear], module: nn.Module) -> nn.Module:
    """Copy each dense linear of ``layers`` into torch's ``weight_<key>`` / ``bias_<key>``
    of ``module``, with their ``requires_grad``; ``module``."""
    for key, linear in layers.items():
        copy_parameter(getattr(module, f"weight_{key}"), linear.weight)
        if linear.bias is not None:
            copy_parameter(getattr(module, f"bias_{key}"), linear.bias)
    return module


def lstm_update(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(h, c)`` after one LSTM step, from the summed input and hidden parts of the gates
    ``(N, 4·hidden)`` and the cell state before it."""
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_update(from_input: Tensor, from_hidden: Tensor, h: Tensor) -> Tensor:
    """``h`` after one GRU step, from the input's and the hidden state's parts of the gates
    (each ``(N, 3·hidden)``, biases included) and ``h`` before it."""
    x_r, x_z, x_n = from_input.chunk(3, -1)
    h_r, h_z, h_n = from_hidden.chunk(3, -1)  # the reset gate scales h_n, bias included
    reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    new = torch.tanh(x_n + reset * h_n)
    return (1 - update) * new + update * h


def rnn_update(total: Tensor, nonlinearity: str) -> Tensor:
    """``h`` after one step of an Elman RNN from the summed input and hidden products."""
    return torch.tanh(total) if nonlinearity == "tanh" else torch.relu(total)


def check_nonlinearity(nonlinearity: object) -> None:
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
