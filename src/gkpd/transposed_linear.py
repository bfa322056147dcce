"""Hugging Face's ``Conv1D`` (GPT-2, GPT, CTRL, ...): a linear layer whose weight is stored
transposed, ``(in_features, out_features)``, computing ``x @ weight + bias``.

It is planned and compressed as the ``nn.Linear`` it equals (:func:`as_linear`, exact): the
planner and :func:`gkpd.apply_` put that linear in its place, as they unpack attention and
recurrent layers (:data:`gkpd.layers.attention.UNPACKED`), so its plan entries read
``Linear`` and :func:`gkpd.export.merge` gives back an ``nn.Linear`` (the same function).

transformers is never imported here: a model holding a ``Conv1D`` has imported it already.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

__all__ = ["as_linear", "is_transposed_linear"]


def _conv1d_type() -> type[nn.Module] | None:
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``."""
    kind = _conv1d_type()
    return kind is not None and isinstance(module, kind)


def as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what the ``Conv1D`` ``module`` does: its weight
    transposed (a copy), its bias, its ``requires_grad`` and training mode."""
    if not is_transposed_linear(module):
        raise TypeError(f"module must be transformers' Conv1D, got {type(module).__name__}")
    weight, bias = module.weight, module.bias
    in_features, out_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        linear.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            linear.bias.copy_(bias)
            linear.bias.requires_grad_(bias.requires_grad)
    return linear.train(module.training)
