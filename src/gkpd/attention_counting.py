"""MACs of attention, which no conv or linear layer holds: closed forms for multi-head
attention and ``F.scaled_dot_product_attention``, and :class:`AttentionCounter`, which counts
them during a forward pass (for :func:`gkpd.counting.count_model` and the planner's trace;
``docs/design.md`` §6)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionCounter", "attention_products_macs", "multihead_attention_macs",
           "sdpa_macs"]


def attention_products_macs(
    module: nn.Module, query_shape: Sequence[int], key_shape: Sequence[int]
) -> int:
    """MACs of the products of a multi-head attention call, ``QKᵀ`` and the weighted sum of
    the values: ``2·N·L·S·embed_dim``, with ``S`` the key length plus one for ``bias_k`` and
    one for ``add_zero_attn``. ``module``: an ``nn.MultiheadAttention`` or
    :class:`gkpd.layers.attention.UnpackedMultiheadAttention`; shapes as its forward takes them
    (``batch_first`` or not, or unbatched)."""
    if len(query_shape) == 3 and module.batch_first:
        (batch, length), keys = query_shape[:2], key_shape[1]
    elif len(query_shape) == 3:
        (length, batch), keys = query_shape[:2], key_shape[0]
    else:
        batch, length, keys = 1, query_shape[0], key_shape[0]
    keys += (module.bias_k is not None) + bool(module.add_zero_attn)
    return 2 * batch * length * keys * module.embed_dim


def multihead_attention_macs(
    module: nn.MultiheadAttention, query_shape: Sequence[int], key_shape: Sequence[int]
) -> int:
    """MACs of one call of torch's ``nn.MultiheadAttention``: its four projections (which it
    runs from its packed weights, never calling them as layers) and the attention products."""
    e = module.embed_dim
    queries, keys = math.prod(query_shape[:-1]), math.prod(key_shape[:-1])
    projections = 2 * queries * e * e + keys * e * (module.kdim + module.vdim)
    return projections + attention_products_macs(module, query_shape, key_shape)


def sdpa_macs(query_shape: Sequence[int], key_shape: Sequence[int],
              value_shape: Sequence[int]) -> int:
    """MACs of ``F.scaled_dot_product_attention``: ``QKᵀ`` and the weighted sum of the values,
    ``(…, L, E)·(…, S, E)ᵀ`` and ``(…, L, S)·(…, S, Ev)``."""
    rows, keys = math.prod(query_shape[:-1]), key_shape[-2]
    return rows * keys * (query_shape[-1] + value_shape[-1])


def _argument(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs.get(name)


def _is_attention(module: nn.Module) -> bool:
    """torch's multi-head attention, or a module that counts its own attention products."""
    return isinstance(module, nn.MultiheadAttention) or callable(
        getattr(module, "attention_macs", None)
    )


class AttentionCounter(TorchFunctionMode):
    """While active (``with AttentionCounter(model, record):``), counts the attention products
    that forward passes of ``model`` run and calls ``record(name, kind, params, macs, input_shape,
    output_shape)`` for each call:

    * an ``nn.MultiheadAttention``: its projections too (torch runs them from its packed
      weights, not as layers), by :func:`multihead_attention_macs`; ``params``: its own;
    * a module with an ``attention_macs(query_shape, key_shape)`` method (gkpd's
      ``UnpackedMultiheadAttention``, whose projections are layers counted on their own);
    * an ``F.scaled_dot_product_attention`` called outside those, named after the innermost
      module running it, by :func:`sdpa_macs`.
    """

    def __init__(self, model: nn.Module, record: Callable[..., None]) -> None:
        super().__init__()
        self.model, self.record = model, record
        self.running: list[str] = []  # names of the modules whose forward is running
        self.attention_depth = 0
        self.handles: list = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter_for(name)))
            attention = _is_attention(module)
            self.handles.append(module.register_forward_hook(
                self._exit_for(name, attention), with_kwargs=True, always_call=True
            ))
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return super().__exit__(*exc)

    def _enter_for(self, name: str):
        def enter(module, args):
            self.running.append(name)
            if _is_attention(module):
                self.attention_depth += 1

        return enter

    def _exit_for(self, name: str, attention: bool):
        def exit_(module, args, kwargs, output):
            self.running.pop()
            if not attention:
                return
            self.attention_depth -= 1
            query, key = _argument(args, kwargs, 0, "query"), _argument(args, kwargs, 1, "key")
            if self.attention_depth or not isinstance(query, torch.Tensor):
                return
            if isinstance(module, nn.MultiheadAttention):
                macs = multihead_attention_macs(module, query.shape, key.shape)
                params = sum(p.numel() for p in module.parameters())
            else:
                macs = module.attention_macs(query.shape, key.shape)
                params = sum(p.numel() for p in module.parameters(recurse=False))
            out = output[0] if isinstance(output, tuple) else output
            self.record(name, type(module).__name__, params, macs, tuple(query.shape),
                        tuple(getattr(out, "shape", ())))

        return exit_

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and not self.attention_depth:
            q, k, v = (_argument(args, kwargs, i, n) for i, n in enumerate(("query", "key",
                                                                            "value")))
            name = (self.running[-1] if self.running else "") or "(model)"
            self.record(name, "scaled_dot_product_attention", 0,
                        sdpa_macs(q.shape, k.shape, v.shape), tuple(q.shape), tuple(result.shape))
        return result
