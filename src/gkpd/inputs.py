"""Example inputs and model outputs of any form: the one place that knows how a model is called.

An example input is what the library runs a user's model on (planning, counting, timing,
summary, export, calibration, training batches). Its form says how the model is called:

* a tensor ``x``: ``model(x)``;
* a tuple ``x``: positional inputs, ``model(*x)``;
* a mapping ``x`` (a dict, or a Hugging Face ``BatchEncoding``): keyword inputs,
  ``model(**x)``;
* anything else (a list of images, say) is one positional input.

:class:`ModelCall` holds the result, ``model(*args, **kwargs)``; its values may nest tensors in
tuples, lists and dicts. A model's output may be a tensor, a tuple or list, a mapping or a
dataclass (Hugging Face's ``ModelOutput`` is both) of such; :func:`output_tensors` flattens it
into its tensors for comparisons. A leaf module: it imports nothing of gkpd.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ModelCall", "eval_mode", "map_tensors", "output_tensors"]

_EXPECTED = ("a tensor, a tuple of positional inputs or a dict of keyword inputs, holding at "
             "least one tensor")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block (batch-norm statistics and dropout untouched by
    the runs in it); afterwards every module is back in its own mode, mixed ones included."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, training in modes.items():
            m.training = training


def map_tensors(fn: Callable[[Tensor], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (nested in tuples, lists, dicts and
    dataclasses), each container rebuilt as its own type: a Hugging Face ``ModelOutput`` (a
    dataclass and a dict) stays one, with its attributes. A mapping whose type cannot be
    rebuilt from a dict becomes a dict."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(map_tensors(fn, v) for v in value))
    if isinstance(value, tuple | list):
        return type(value)(map_tensors(fn, v) for v in value)
    if isinstance(value, Mapping):
        mapped = {k: map_tensors(fn, v) for k, v in value.items()}
        if dataclasses.is_dataclass(value):  # ModelOutput: its set fields are its keys
            return type(value)(**mapped)
        return type(value)(mapped) if type(value) in _MAPPINGS_FROM_DICT else mapped
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{
            f.name: map_tensors(fn, getattr(value, f.name))
            for f in dataclasses.fields(value) if f.init
        })
    return value


_MAPPINGS_FROM_DICT = (dict, OrderedDict)


def _tensors(value: Any) -> list[Tensor]:
    found: list[Tensor] = []
    map_tensors(found.append, value)
    return found


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, tuple | list):
        inner = ", ".join(_describe(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in value.items()) + "}"
    return type(value).__name__ if value is not None else "None"


@dataclass(frozen=True)
class ModelCall:
    """How a model is called on an example input: ``model(*args, **kwargs)``.

    :meth:`of` reads any example input (see the module docstring); the other methods work on
    every tensor of the call, wherever it is nested.
    """

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, example_input: Any, argument: str = "example_input") -> ModelCall:
        """The call that ``example_input`` stands for; ``TypeError`` (naming ``argument``)
        unless it holds a tensor."""
        if isinstance(example_input, ModelCall):
            return example_input
        if isinstance(example_input, tuple):
            call = cls(example_input)
        elif isinstance(example_input, Mapping):
            keys = [k for k in example_input if not isinstance(k, str)]
            if keys:
                raise TypeError(f"{argument} is a mapping of keyword inputs: its keys must be "
                                f"argument names (str), got {keys[0]!r}")
            call = cls((), dict(example_input))
        else:
            call = cls((example_input,))
        if not call.tensors():
            raise TypeError(
                f"{argument} must be {_EXPECTED}; got {_describe(example_input):.200}"
            )
        if call.batch == 0:
            raise ValueError(f"{argument} has an empty batch ({call.describe()}): give at "
                             "least one sample")
        return call

    def run(self, model: nn.Module | Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def run_or_explain(self, model: nn.Module, argument: str = "example_input") -> Any:
        """:meth:`run`, its failure a ``ValueError`` that names ``argument`` and its shapes
        (a model called with an input it cannot take fails deep inside torch)."""
        try:
            return self.run(model)
        except Exception as error:
            hint = ""
            if len(self.args) == 1 and isinstance(self.args[0], list) and not self.kwargs:
                hint = (" (a list is one argument, model(x), as a detection model takes its "
                        "images; pass a tuple for positional inputs, model(*x))")
            raise ValueError(
                f"the model failed on {argument} ({self.describe()}): {error}{hint}"
            ) from error

    def map(self, fn: Callable[[Tensor], Any]) -> ModelCall:
        """The call with ``fn`` applied to each of its tensors."""
        return ModelCall(map_tensors(fn, self.args), map_tensors(fn, self.kwargs))

    def to(self, device: torch.device | str | None) -> ModelCall:
        """The call with its tensors on ``device`` (``None``: where they are)."""
        return self if device is None else self.map(lambda t: t.to(device))

    def tensors(self) -> list[Tensor]:
        """Every tensor of the call: the positional inputs', then the keyword inputs'."""
        return _tensors(self.args) + _tensors(self.kwargs)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the first tensor (what a one-tensor input's shape is)."""
        return tuple(int(s) for s in self.tensors()[0].shape)

    @property
    def batch(self) -> int:
        """The batch size: dim 0 of the first tensor of 2 or more dims (1 if there is none,
        as for one unbatched vector)."""
        return next((int(t.shape[0]) for t in self.tensors() if t.dim() > 1), 1)

    def rows(self, start: int, stop: int) -> ModelCall:
        """Samples ``start`` to ``stop`` (exclusive): every tensor sliced along dim 0
        (scalars stay)."""
        return self.map(lambda t: t[start:stop] if t.dim() else t)

    def describe(self) -> str:
        """Dtypes and shapes, for messages: ``float32[2, 3, 32, 32]``, ``(float32[2, 8],
        int64[2])``, ``input_ids=int64[2, 7], attention_mask=int64[2, 7]``."""
        parts = [_describe(a) for a in self.args]
        if len(self.args) > 1 and not self.kwargs:
            return "(" + ", ".join(parts) + ")"
        parts += [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def output_tensors(output: Any) -> list[Tensor]:
    """The tensors of a model's output, in order: a tensor; a tuple or list, a mapping (values
    in order; Hugging Face's ``ModelOutput`` included) or a dataclass (fields in order) of
    outputs, and a Hugging Face key/value cache (its layers' tensors in order). ``None``
    holds none (an output left unset); anything else is a ``TypeError``."""
    if output is None:
        return []
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, tuple | list):
        return [t for item in output for t in output_tensors(item)]
    if isinstance(output, Mapping):
        return [t for item in output.values() for t in output_tensors(item)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [t for f in dataclasses.fields(output)
                for t in output_tensors(getattr(output, f.name))]
    if _is_key_value_cache(output):  # iterates its layers' (keys, values, ...) tuples
        return [t for layer in output for t in output_tensors(layer)]
    raise TypeError("a model output must be tensors, or tuples, lists, dicts or dataclasses "
                    f"of them; got {type(output).__name__}")


def _is_key_value_cache(value: Any) -> bool:
    """A Hugging Face ``Cache`` (``past_key_values`` of a decoder's output)."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers.")
               for c in type(value).__mro__)
