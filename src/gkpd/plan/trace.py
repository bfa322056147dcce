"""What the planner and whole-model methods learn from one forward pass: the conv/linear
layers a model calls, in call order, with their input shapes, and the MACs of the attention
products it computes; and the dense plan entry of a layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gkpd.attention_counting import AttentionCounter
from gkpd.counting import module_macs, module_params
from gkpd.inputs import ModelCall, eval_mode
from gkpd.plan.schema import LayerPlan
from gkpd.plan.select import as_pattern_list

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding)  # an embedding: its ids shape


@dataclass
class LayerCall:
    """A traced layer: the module, the input shape of its first call, and those of the calls
    after it (a layer may be called again, on inputs of other sizes)."""

    module: nn.Module
    input_shape: tuple[int, ...]
    later_shapes: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return 1 + len(self.later_shapes)

    @property
    def one_size(self) -> bool:
        return all(shape == self.input_shape for shape in self.later_shapes)

    def macs_of(self, module: nn.Module) -> int:
        """MACs per sample of ``module`` called as this layer was, every call (each call's
        batch set to 1)."""
        return sum(module_macs(module, per_sample(shape))
                   for shape in (self.input_shape, *self.later_shapes))

    def dense_macs(self) -> int:
        return self.macs_of(self.module)

    def first_call_macs(self) -> int:
        """MACs per sample of the module's first call."""
        return module_macs(self.module, per_sample(self.input_shape))

    def over_calls(self, macs: int) -> int:
        """``macs`` of a replacement's call at the first call's size, over every call: the
        same count per call when all calls have that size, else scaled as the dense
        layer's MACs are at each call's size."""
        if self.one_size:
            return macs * self.calls
        first = self.first_call_macs()
        return round(macs * self.dense_macs() / first) if first else macs * self.calls


@dataclass
class Trace:
    """One forward pass: its conv/linear ``layers`` (:func:`trace_layers`) and the MACs of its
    attention products per sample (per entry of the example input's first dimension), which
    no layer holds and compression leaves as they are."""

    layers: dict[str, LayerCall]
    attention_macs: int


def trace_layers(model: nn.Module, example_input: Any) -> dict[str, LayerCall]:
    """Conv/linear layers in the order the forward pass calls them, with their input shape.
    ``example_input``: a tensor, a tuple of positional or a dict of keyword inputs
    (:class:`gkpd.inputs.ModelCall`)."""
    return trace(model, example_input).layers


def trace(model: nn.Module, example_input: Any) -> Trace:
    """The layers and the attention MACs of one forward pass on ``example_input``."""
    call = ModelCall.of(example_input)
    seen: dict[str, LayerCall] = {}
    handles = []
    attention = [0]

    def count_attention(name, kind, params, macs, *shapes) -> None:
        attention[0] += macs

    def hook_for(name: str):
        def hook(module, args, _output):
            if name in seen:
                first = args[0] if args and isinstance(args[0], torch.Tensor) else None
                seen[name].later_shapes.append(
                    seen[name].input_shape if first is None else tuple(first.shape))
            elif args and isinstance(args[0], torch.Tensor):
                seen[name] = LayerCall(module, tuple(args[0].shape))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_hook(hook_for(name)))
    try:
        with eval_mode(model), torch.no_grad(), AttentionCounter(model, count_attention):
            call.run_or_explain(model)
    finally:
        for handle in handles:
            handle.remove()
    return Trace(seen, attention[0] // max(call.batch, 1))


def per_sample(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` with its batch dimension set to 1 (a 1-d shape as it is)."""
    return (1, *shape[1:]) if len(shape) > 1 else shape


def dense_entry(name: str, call: LayerCall, **fields: Any) -> LayerPlan:
    """The plan entry of a layer left as it is: its dense size and MACs per sample."""
    module, input_shape = call.module, per_sample(call.input_shape)
    dense_macs = call.dense_macs()
    params = module_params(module)
    return LayerPlan(
        name=name, module_type=type(module).__name__, weight_shape=tuple(module.weight.shape),
        input_shape=input_shape, dense_params=params, dense_macs=dense_macs, params=params,
        macs=dense_macs, **fields,
    )


def pattern_names(patterns, argument: str) -> list[str]:
    """``include``/``exclude`` patterns as the plan's options record them (types by name)."""
    return [p.__name__ if isinstance(p, type) else p for p in as_pattern_list(patterns, argument)]
