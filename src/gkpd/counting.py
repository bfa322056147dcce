"""Parameters and multiply-accumulates (MACs) of dense and Kronecker layers.

Closed forms for a given input size, for either stage order of a Kronecker layer
(docs/design.md §6), and :func:`count_model`, which runs a model once with forward hooks and
counts every ``nn.Conv*d``, ``nn.Linear`` (and transformers' ``Conv1D``, a linear layer) and
recurrent layer or cell (``nn.LSTM``,
``nn.GRU``, ``nn.RNN``, ``nn.LSTMCell``, ...: their matrix products, not the elementwise gate
math) it calls, and every module that counts itself: one with a ``macs(input_shape)``
method (the Kronecker layers, the tensor-train/ring layers of ``gkpd.methods``). Such a
module's own count covers everything its forward runs, so the modules it calls are not
counted again. The Kronecker layers use the same formulas to pick the cheaper order, so what
is counted here is what runs.

The convolution geometry these formulas stand on (padding, output sizes, group splits, stage
strides) is :mod:`gkpd.geometry`, the attention's :mod:`gkpd.attention_counting`; their names
are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from gkpd.attention_counting import (
    AttentionCounter,
    attention_products_macs,
    multihead_attention_macs,
    sdpa_macs,
)
from gkpd.deprecation import renamed
from gkpd.geometry import (
    ORDERS,
    conv_output_shape,
    group_split,
    ntuple,
    padding_stage,
    resolve_padding,
    stage_paddings,
    stage_strides,
)
from gkpd.inputs import ModelCall, eval_mode
from gkpd.transposed_linear import is_transposed_linear

__all__ = [
    "ORDERS",
    "AttentionCounter",
    "LayerCount",
    "ModelCount",
    "attention_products_macs",
    "best_order",
    "conv_macs",
    "conv_output_shape",
    "conv_params",
    "count_model",
    "counts_itself",
    "group_split",
    "kronecker_conv_intermediate_numel",
    "kronecker_conv_macs",
    "kronecker_conv_order_macs",
    "kronecker_linear_macs",
    "kronecker_linear_order_macs",
    "kronecker_params",
    "linear_macs",
    "linear_params",
    "module_macs",
    "module_params",
    "multihead_attention_macs",
    "padding_stage",
    "recurrent_macs",
    "sdpa_macs",
    "resolve_padding",
    "stage_paddings",
    "stage_strides",
]


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order {order!r} is not supported: expected one of {ORDERS}")


# ----------------------------------------------------------------------------- closed forms


def conv_params(
    in_channels: int, out_channels: int, kernel_size: Sequence[int], groups: int = 1,
    bias: bool = True,
) -> int:
    return out_channels * (in_channels // groups) * math.prod(kernel_size) + (
        out_channels if bias else 0
    )


def conv_macs(
    input_spatial: Sequence[int],
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    batch: int = 1,
) -> int:
    """MACs of a dense ``nn.Conv*d`` on an input of spatial size ``input_spatial``."""
    n = len(kernel_size)
    st, dl = ntuple("stride", stride, n), ntuple("dilation", dilation, n)
    pads = resolve_padding(padding, kernel_size, st, dl)
    out = conv_output_shape(input_spatial, kernel_size, st, pads, dl)
    return (
        batch * out_channels * math.prod(out) * (in_channels // groups) * math.prod(kernel_size)
    )


def linear_params(in_features: int, out_features: int, bias: bool = True) -> int:
    return in_features * out_features + (out_features if bias else 0)


def linear_macs(in_features: int, out_features: int, batch: int = 1) -> int:
    return batch * in_features * out_features


def kronecker_params(
    a_shape: Sequence[int], b_shape: Sequence[int], rank: int, bias: int = 0
) -> int:
    """``R·(∏a + ∏b)`` plus ``bias`` (the number of bias entries)."""
    return rank * (math.prod(a_shape) + math.prod(b_shape)) + bias


def kronecker_conv_order_macs(
    input_spatial: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    rank: int,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    batch: int = 1,
    padding_mode: str = "zeros",
) -> dict[str, int]:
    """MACs of a Kronecker convolution for each stage order: ``{"b_first": …, "a_first": …}``.

    ``a_shape = (F1, C1, *K1)`` and ``b_shape = (F2, C2, *K2)`` are the factor shapes of the
    weight ``(F, C/groups, *K)``.
    """
    stages = _conv_stages(input_spatial, a_shape, b_shape, rank, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, batch=batch,
                          padding_mode=padding_mode)
    return {order: first + second for order, (first, second, _) in stages.items()}


def kronecker_conv_intermediate_numel(
    input_spatial: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int], rank: int,
    **geometry: Any,
) -> dict[str, int]:
    """Elements of the tensor between the two stages of each stage order (``geometry``: the
    keyword arguments of :func:`kronecker_conv_order_macs`): a badly matched order can make it
    far larger than the layer's input and output."""
    stages = _conv_stages(input_spatial, a_shape, b_shape, rank, **geometry)
    return {order: between for order, (_, _, between) in stages.items()}


def _conv_stages(input_spatial, a_shape, b_shape, rank, *, stride=1, padding=0, dilation=1,
                 groups=1, batch=1, padding_mode="zeros") -> dict[str, tuple[int, int, int]]:
    """``(first stage MACs, second stage MACs, elements between them)`` of each order."""
    n = len(a_shape) - 2
    f1, c1, *k1 = a_shape
    f2, c2, *k2 = b_shape
    kernel = [x * y for x, y in zip(k1, k2, strict=True)]
    st, dl = ntuple("stride", stride, n), ntuple("dilation", dilation, n)
    pads = resolve_padding(padding, kernel, st, dl)
    out = math.prod(conv_output_shape(input_spatial, kernel, st, pads, dl))
    g1, g2 = group_split(groups, a_shape, b_shape)
    zero = ((0, 0),) * n
    padded = [s + pl + pr for s, (pl, pr) in zip(input_spatial, pads, strict=True)]
    result = {}
    for order in ORDERS:
        s1, _ = stage_strides(order, k1, k2, st)
        paddings = stage_paddings(order, k1, k2, st, pads, padding_mode)
        first_in = padded if paddings is None else [
            s + 2 * p for s, p in zip(input_spatial, paddings[0], strict=True)]
        if order == "b_first":
            o1 = math.prod(conv_output_shape(first_in, k2, s1, zero, dl))
            between = batch * g1 * c1 * rank * f2 * o1
            first = between * c2 * math.prod(k2)
            second = batch * f2 * f1 * rank * c1 * math.prod(k1) * out
        else:
            dil_a = [d * k for d, k in zip(dl, k2, strict=True)]
            o1 = math.prod(conv_output_shape(first_in, k1, s1, zero, dil_a))
            between = batch * g2 * c2 * rank * f1 * o1
            first = between * c1 * math.prod(k1)
            second = batch * f1 * f2 * rank * c2 * math.prod(k2) * out
        result[order] = (first, second, between)
    return result


def best_order(order_macs: dict[str, int]) -> str:
    """The cheaper order (``"b_first"`` on a tie)."""
    return min(ORDERS, key=lambda o: (order_macs[o], ORDERS.index(o)))


def _macs_in_order(order_macs: dict[str, int], order: str) -> int:
    """MACs of ``order``; ``"auto"``: of the cheaper order, the one a layer runs."""
    if order == "auto":
        return order_macs[best_order(order_macs)]
    _check_order(order)
    return order_macs[order]


def kronecker_conv_macs(
    input_spatial: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    rank: int,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    batch: int = 1,
    order: str = "auto",
    padding_mode: str = "zeros",
) -> int:
    """MACs of a Kronecker convolution in ``order`` (``"auto"``: the cheaper, which the layer
    runs)."""
    macs = kronecker_conv_order_macs(
        input_spatial, a_shape, b_shape, rank, stride=stride, padding=padding,
        dilation=dilation, groups=groups, batch=batch, padding_mode=padding_mode,
    )
    return _macs_in_order(macs, order)


def kronecker_linear_order_macs(
    a_shape: Sequence[int], b_shape: Sequence[int], rank: int, batch: int = 1
) -> dict[str, int]:
    """MACs of a Kronecker linear layer (``a=(O1, I1)``, ``b=(O2, I2)``) for each order."""
    (o1, i1), (o2, i2) = a_shape, b_shape
    return {
        "b_first": batch * rank * (i1 * i2 * o2 + o1 * i1 * o2),
        "a_first": batch * rank * (o1 * i1 * i2 + o1 * i2 * o2),
    }


def kronecker_linear_macs(
    a_shape: Sequence[int], b_shape: Sequence[int], rank: int, batch: int = 1,
    order: str = "auto",
) -> int:
    return _macs_in_order(kronecker_linear_order_macs(a_shape, b_shape, rank, batch), order)


# ----------------------------------------------------------------------------- modules


def module_params(module: nn.Module) -> int:
    """Parameters owned by ``module`` and its children."""
    return sum(p.numel() for p in module.parameters())


def counts_itself(module: nn.Module) -> bool:
    """Whether ``module`` gives its own MACs: it has a ``macs(input_shape)`` method, whose
    count covers every operation of its forward (its submodules included)."""
    return callable(getattr(module, "macs", None))


def recurrent_macs(module: nn.RNNBase | nn.RNNCellBase, input_shape: Sequence[int]) -> int:
    """MACs of one call of torch's ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` on an input of
    ``input_shape`` (``(L, N, in)``, ``(N, L, in)``, or ``(rows, in)`` unbatched or packed):
    at every step, per layer and direction, the input-to-gates and hidden-to-gates products
    and an LSTM's projection, what its unpacked equivalent's linear layers count; of one step
    of a cell (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``; ``(N, in)`` or ``(in,)``), its
    two products. The gate nonlinearities and elementwise products are not counted, as usual
    (``O(hidden)`` per step against the products' ``O(hidden²)``)."""
    rows = math.prod(int(s) for s in input_shape[:-1])  # time steps × sequences
    if isinstance(module, nn.RNNCellBase):
        return rows * module.weight_ih.shape[0] * (module.input_size + module.hidden_size)
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    hidden, projected = module.hidden_size, module.proj_size
    state = projected or hidden
    directions = 2 if module.bidirectional else 1
    per_row = 0
    for layer in range(module.num_layers):
        inputs = module.input_size if layer == 0 else directions * state
        per_row += directions * (gates * hidden * (inputs + state) + hidden * projected)
    return rows * per_row


def module_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one call of ``module`` on an input of ``input_shape``: its own ``macs`` (see
    :func:`counts_itself`), else those of a conv, linear or recurrent layer
    (:func:`recurrent_macs`; 0 for other modules)."""
    shape = tuple(int(s) for s in input_shape)
    if counts_itself(module):
        return int(module.macs(shape))
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):
        return recurrent_macs(module, shape)
    if isinstance(module, nn.Linear):
        return linear_macs(module.in_features, module.out_features, math.prod(shape[:-1]))
    if is_transposed_linear(module):  # transformers' Conv1D: weight (in, out)
        return linear_macs(*module.weight.shape, math.prod(shape[:-1]))
    if isinstance(module, nn.modules.conv._ConvNd):
        n = len(module.kernel_size)
        batched = len(shape) == n + 2
        batch = shape[0] if batched else 1
        if module.transposed:  # every input element meets (F/groups)·∏K weights
            return (
                batch * math.prod(shape[-n:]) * module.in_channels
                * (module.out_channels // module.groups) * math.prod(module.kernel_size)
            )
        return conv_macs(
            shape[-n:], module.in_channels, module.out_channels, module.kernel_size,
            module.stride, module.padding, module.dilation, module.groups, batch=batch,
        )
    return 0


@dataclass
class LayerCount:
    """Counts for one module called during :func:`count_model`."""

    name: str
    kind: str
    params: int
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    path: str | None = None  # what a Kronecker layer ran (gkpd.layers.base)
    calls: int = 1

    order = renamed("order", "path")


@dataclass
class ModelCount:
    """Per-layer counts (conv and linear layers, modules that count themselves, attention) and
    whole-model totals.

    ``total_params`` counts every parameter of the model; ``total_macs`` sums the layers.
    """

    layers: list[LayerCount] = field(default_factory=list)
    total_params: int = 0

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    def __getitem__(self, name: str) -> LayerCount:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def count_model(model: nn.Module, example_input: object) -> ModelCount:
    """Run ``model`` once on ``example_input`` (in eval mode, without gradients) and count the
    parameters and MACs of every conv and linear layer it calls, of every module that
    counts itself (:func:`counts_itself`: Kronecker, tensor-train and tensor-ring layers) and
    of the attention it computes (:class:`AttentionCounter`: multi-head attention modules and
    ``F.scaled_dot_product_attention``).

    A call made inside the forward of a module that counts itself is part of that module's
    count and is not counted again. ``example_input`` is a tensor, a tuple of positional or
    a dict of keyword inputs (:class:`gkpd.inputs.ModelCall`).
    """
    call = ModelCall.of(example_input)
    result = ModelCount(total_params=module_params(model))
    entries: dict[str, LayerCount] = {}
    handles = []
    inside = [0]  # calls of self-counting modules now running

    def enter(module: nn.Module, args: tuple) -> None:
        inside[0] += 1

    def record(name, kind, params, macs, shape, out_shape, path=None) -> None:
        if inside[0]:
            return
        if name in entries:
            entries[name].macs += macs
            entries[name].calls += 1
            return
        entries[name] = LayerCount(name, kind, params, macs, shape, out_shape, path)
        result.layers.append(entries[name])

    def hook_for(name: str, own: bool):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if own:
                inside[0] -= 1
            first = args[0] if args else None
            if isinstance(first, PackedSequence):  # a recurrent layer's: its rows are steps
                first = first.data
            if inside[0] or not isinstance(first, torch.Tensor):
                return
            shape = tuple(first.shape)
            out = output[0] if isinstance(output, tuple) else output  # a recurrent layer's
            out_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
            path = module.resolve_path(shape) if hasattr(module, "resolve_path") else None
            record(name, type(module).__name__, module_params(module), module_macs(module, shape),
                   shape, out_shape, path)

        return hook

    for name, module in model.named_modules():
        own = counts_itself(module)
        if own:
            handles.append(module.register_forward_pre_hook(enter))
        if own or is_transposed_linear(module) or isinstance(
            module, nn.modules.conv._ConvNd | nn.Linear | nn.RNNBase | nn.RNNCellBase
        ):
            handles.append(module.register_forward_hook(hook_for(name, own)))
    try:
        with eval_mode(model), torch.no_grad(), AttentionCounter(model, record):
            call.run_or_explain(model)
    finally:
        for handle in handles:
            handle.remove()
    return result
