"""What the recurrent layers (:mod:`gkpd.layers.recurrent`) and cells
(:mod:`gkpd.layers.recurrent_cells`) share: the gate arithmetic of one step, in torch's gate
order and formulas (the ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` docs), and the copies between
torch's ``weight_<gate>_<suffix>`` parameters and the gate layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["check_nonlinearity", "copy_from_torch", "copy_to_torch", "dense_linear",
           "gru_update", "lstm_update", "rnn_update"]


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
    with torch.no_grad():
        for key, target in layers.items():
            for kind in ("weight", "bias"):
                source = getattr(module, f"{kind}_{key}", None)
                if source is not None:
                    getattr(target, kind).copy_(source)
                    getattr(target, kind).requires_grad_(source.requires_grad)


def copy_to_torch(layers: dict[str, nn.Linear], module: nn.Module) -> nn.Module:
    """Copy each dense linear of ``layers`` into torch's ``weight_<key>`` / ``bias_<key>``
    of ``module``; ``module``."""
    with torch.no_grad():
        for key, linear in layers.items():
            getattr(module, f"weight_{key}").copy_(linear.weight)
            if linear.bias is not None:
                getattr(module, f"bias_{key}").copy_(linear.bias)
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
