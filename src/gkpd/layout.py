"""The memory layout a model runs in, owned by the model: ``run_in_layout(model,
"channels_last")`` converts its weights and makes it convert its inputs on entry and give its
outputs back in the caller's layout.

On CPU the grouped and depthwise convolutions of factored layers are several times faster on
channels_last tensors (oneDNN's fast kernels are for that layout), so a latency plan records
the layout it was timed fastest in (``CompressionPlan.layout``) and :func:`gkpd.apply_` runs
the compressed model in it: the caller keeps passing NCHW tensors and gets NCHW tensors back.
A leaf module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gkpd.inputs import map_tensors
from gkpd.layers.base import refuse_script

__all__ = ["LAYOUTS", "has_strides_of", "in_memory_format", "layout_of", "memory_format",
           "run_in_layout", "to_layout"]

# "contiguous": NCHW (NCDHW), as tensors come; "channels_last": NHWC (NDHWC), channels innermost
LAYOUTS = ("contiguous", "channels_last")


def check_layout(layout: Any, name: str = "layout", *, auto: bool = False) -> str:
    """``layout`` if it is one of ``LAYOUTS`` (or, with ``auto``, ``"auto"``: the faster,
    timed), else a ValueError naming ``name``."""
    if layout not in LAYOUTS and not (auto and layout == "auto"):
        expected = f"'auto' or one of {LAYOUTS}" if auto else f"one of {LAYOUTS}"
        raise ValueError(f"{name} must be {expected}, got {layout!r}")
    return layout


def memory_format(layout: str, dim: int) -> torch.memory_format | None:
    """The torch memory format of ``layout`` for a tensor of ``dim`` dims; ``None`` where the
    layout says nothing (channels_last is defined for 4-d and 5-d tensors only)."""
    if check_layout(layout) == "contiguous":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(dim)


def to_layout(x: Any, layout: str) -> Any:
    """``x`` (a tensor, or tuples, lists, dicts and dataclasses of them, each kept of its
    type: :func:`gkpd.inputs.map_tensors`) with its 4-d and 5-d tensors in ``layout``; other
    values as they are."""

    def convert(t: Tensor) -> Tensor:
        fmt = memory_format(layout, t.dim()) if t.dim() in (4, 5) else None
        return t if fmt is None else in_memory_format(t, fmt)

    return map_tensors(convert, x)


def in_memory_format(x: Tensor, fmt: torch.memory_format) -> Tensor:
    """``x`` with exactly the strides of ``fmt`` (a copy unless it has them). Neither
    ``.contiguous(memory_format=)`` nor ``.to(memory_format=)`` does that always: the first
    keeps NCHW strides on a tensor contiguous in both layouts (one channel, or 1x1 spatial) —
    a 1-channel input and stem weight then make the stem's output, and so the whole model, run
    in NCHW — and the second keeps some permuted strides (a reconstructed weight's)."""
    if has_strides_of(x, fmt):
        return x
    return torch.empty_like(x, memory_format=fmt).copy_(x)


def has_strides_of(x: Tensor, fmt: torch.memory_format) -> bool:
    """Whether ``x`` has exactly the strides of ``fmt``: unlike ``is_contiguous``, this tells
    apart the layouts of a tensor contiguous in both (one channel, or one pixel), as torch's
    convolutions do when they choose their kernels."""
    return x.stride() == torch.empty(x.shape, device="meta", memory_format=fmt).stride()


def _first_image(values: Any) -> Tensor | None:
    """The first 4-d or 5-d tensor in ``values`` (tensors, tuples, lists, dicts)."""
    if isinstance(values, Tensor):
        return values if values.dim() in (4, 5) else None
    items = values.values() if isinstance(values, dict) else values
    if isinstance(values, tuple | list | dict):
        for value in items:
            if (found := _first_image(value)) is not None:
                return found
    return None


class _LayoutHooks:
    """The forward pre-hook and hook of a model run in channels_last: inputs converted on
    entry; outputs given back contiguous unless the caller's first image-like input was
    channels_last already. A plain picklable object (``peak_memory_mb`` pickles models);
    ``_callers`` is a stack, so nested calls of the same model pair up."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self._callers: list[bool] = []

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        first = _first_image((args, kwargs))
        self._callers.append(
            first is not None and not first.is_contiguous()
            and first.is_contiguous(memory_format=memory_format(self.layout, first.dim()))
        )
        return to_layout(args, self.layout), to_layout(kwargs, self.layout)

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        caller_in_layout = self._callers.pop() if self._callers else False
        return output if caller_in_layout else map_tensors(_as_from_contiguous, output)


def _as_from_contiguous(t: Tensor) -> Tensor:
    """An output as the model run contiguous gives it: 4-d and 5-d ones in NCHW (NCDHW), and
    views with channels innermost (``f.flatten(2)`` of a channels_last activation) copied
    contiguous, so that a caller's ``.view`` works as it did."""
    if t.dim() in (4, 5):
        return in_memory_format(t, torch.contiguous_format)
    if t.dim() >= 2 and t.stride(1) == 1 and t.shape[1] > 1 and not t.is_contiguous():
        return t.contiguous()
    return t


def _hooks_of(model: nn.Module) -> list[tuple[int, _LayoutHooks]]:
    return [(key, hook.__self__) for key, hook in model._forward_pre_hooks.items()
            if isinstance(getattr(hook, "__self__", None), _LayoutHooks)]


def layout_of(model: nn.Module) -> str:
    """The layout :func:`run_in_layout` put ``model`` in (``"contiguous"`` if none)."""
    hooks = _hooks_of(model)
    return hooks[0][1].layout if hooks else "contiguous"


def run_in_layout(model: nn.Module, layout: str) -> nn.Module:
    """Run ``model`` in ``layout`` from now on; returns ``model``.

    ``"channels_last"``: the weights are converted (4-d ones to ``torch.channels_last``, 5-d
    ones to ``channels_last_3d``) and the model converts its 4-d and 5-d inputs on entry, so
    every layer runs in that layout; outputs come back contiguous unless the caller's input
    was channels_last. ``"contiguous"`` undoes it (and makes every weight contiguous).
    Calling it again with the same layout changes nothing."""
    check_layout(layout)
    for key, hooks in _hooks_of(model):
        _remove_hook(model, key, pre=True)
        for post_key, hook in list(model._forward_hooks.items()):
            if getattr(hook, "__self__", None) is hooks:
                _remove_hook(model, post_key, pre=False)
    model._apply(lambda t: to_layout(t, layout))
    if isinstance(model.__dict__.get("__prepare_scriptable__"), _RefuseScript):
        del model.__dict__["__prepare_scriptable__"]
    if layout != "contiguous":
        hooks = _LayoutHooks(layout)
        model.register_forward_pre_hook(hooks.enter, with_kwargs=True)
        model.register_forward_hook(hooks.leave, with_kwargs=True, always_call=True)
        # what torch.jit.script calls first: TorchScript cannot compile the hooks, and its
        # own error points into this module's annotations
        model.__prepare_scriptable__ = _RefuseScript(model, layout)
    return model


class _RefuseScript:
    """``model.__prepare_scriptable__`` while the model runs in a layout (picklable, unlike
    a closure)."""

    def __init__(self, model: nn.Module, layout: str) -> None:
        self.model_type, self.layout = type(model).__name__, layout

    def __call__(self) -> None:
        refuse_script(
            self.model_type, f"it runs in {self.layout} through forward hooks that convert "
            "its inputs (gkpd.layout.run_in_layout), which TorchScript cannot compile; "
            "gkpd.layout.run_in_layout(model, 'contiguous') removes them"
        )


def _remove_hook(model: nn.Module, key: int, *, pre: bool) -> None:
    # what RemovableHandle.remove() does; a handle is not kept: it holds weak references,
    # which neither pickle nor deepcopy with the model
    if pre:
        model._forward_pre_hooks.pop(key, None)
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    else:
        model._forward_hooks.pop(key, None)
        model._forward_hooks_with_kwargs.pop(key, None)
        model._forward_hooks_always_called.pop(key, None)
