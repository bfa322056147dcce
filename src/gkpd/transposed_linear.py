"""Hugging Face's ``Conv1D`` (GPT-2, GPT, CTRL, ...): a linear layer whose weight is stored
transposed, ``(in_features, out_features)``, computing ``x @ weight + bias``.

It is planned and compressed as the ``nn.Linear`` it equals (:func:`as_linear`, exact): the
planner and :func:`gkpd.apply_` put that linear in its place, as they unpack attention and
recurrent layers (:data:`gkpd.layers.attention.UNPACKED`), so its plan entries read
``Linear``. The linear, and what replaces it, are marked (:func:`stored_transposed`), and
:func:`gkpd.export.merge` gives back a ``Conv1D`` (:func:`as_transposed`): the merged model's
state dict is the original architecture's, loadable by ``from_pretrained`` (an ``nn.Linear``
there held the square ``c_proj`` weights transposed under the same keys).

transformers is never imported here: a model holding a ``Conv1D`` has imported it already.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from gkpd.state_dicts import copy_parameter

__all__ = ["as_linear", "as_transposed", "is_transposed_linear", "mark_like",
           "stored_transposed"]

# the attribute that marks a linear made from a Conv1D, and what replaces it
_MARK = "stored_transposed"


def conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class, where transformers is imported (``None`` otherwise)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D``."""
    kind = conv1d_type()
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
    copy_parameter(linear.weight, weight.t())
    if bias is not None:
        copy_parameter(linear.bias, bias)
    setattr(linear, _MARK, True)
    return linear.train(module.training)


def stored_transposed(module: nn.Module) -> bool:
    """Whether ``module`` stands for a ``Conv1D`` (:func:`as_linear`'s linear, or the layer
    that replaced it: :func:`mark_like`)."""
    return bool(getattr(module, _MARK, False))


def mark_like(replacement: nn.Module, module: nn.Module) -> None:
    """Mark ``replacement`` as standing for a ``Conv1D`` where ``module`` does."""
    if stored_transposed(module):
        setattr(replacement, _MARK, True)


def as_transposed(linear: nn.Linear) -> nn.Module:
    """The ``Conv1D`` that computes what ``linear`` does (the inverse of :func:`as_linear`)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    kind = conv1d_type() or importlib.import_module("transformers.pytorch_utils").Conv1D
    weight, bias = linear.weight, linear.bias
    conv = kind(linear.out_features, linear.in_features).to(weight.device, weight.dtype)
    copy_parameter(conv.weight, weight.t())
    if bias is None:  # Conv1D always has a bias
        copy_parameter(conv.bias, torch.zeros_like(conv.bias, requires_grad=False))
    else:
        copy_parameter(conv.bias, bias)
    return conv.train(linear.training)
