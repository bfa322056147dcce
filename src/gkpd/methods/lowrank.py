"""What the baselines (svd, tucker, cp, tensor_train, tensor_ring) share: which layers they
take, their per-layer overrides, the geometry of a convolution at the planner's input size,
the budget filter, and building plain ``nn.Conv*d``/``nn.Linear`` stages on the dense layer's
device and dtype.

svd, tucker and cp replace a layer by :class:`Stages`, an ``nn.Sequential`` of standard layers,
so counting, ONNX export and ``torch.compile`` see nothing new; tensor_train and tensor_ring
keep their cores in a layer of their own (see ``_tensorized.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from gkpd.counting import conv_output_shape, resolve_padding
from gkpd.layers.base import ReconstructedWeight
from gkpd.methods.base import LayerContext
from gkpd.plan.schema import LayerPlan
from gkpd.whiten import output_error

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def layer_reason(
    module: nn.Module, method: str, *, linear: bool = True, grouped: bool = True
) -> str | None:
    """Why ``method`` cannot take ``module`` (``None``: it can)."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return "transposed convolutions are not supported"
    if not (isinstance(module, nn.Linear) or is_conv(module)):
        return f"{type(module).__name__} is not a conv or linear layer"
    if not module.weight.is_floating_point():
        return f"weight dtype {module.weight.dtype} is not floating point"
    if isinstance(module, nn.Linear) and not linear:
        return f"{method} factors convolution kernels; a linear layer has none (use method='svd')"
    if is_conv(module) and module.groups > 1 and not grouped:
        return f"{method} does not support grouped convolutions (groups={module.groups})"
    return None


def override_settings(ctx: LayerContext, method: str, keys: Sequence[str]) -> dict:
    """The per-layer override for ``ctx`` without ``skip``; every key must be one of
    ``keys`` (the method's own settings)."""
    given = {k: v for k, v in ctx.override.items() if k != "skip"}
    unknown = sorted(k for k in given if k not in keys)
    if unknown:
        raise ValueError(
            f"overrides[{ctx.name!r}] gives {unknown}, which method {method!r} does not take "
            f"(it takes {', '.join(sorted([*keys, 'skip']))})"
        )
    return given


def restrict(
    ctx: LayerContext, params: np.ndarray, macs: np.ndarray, configs: Sequence, wanted, method: str
) -> np.ndarray:
    """Indices of the configurations to offer: the override's ``wanted`` one alone (whatever
    the budget: the user asked for it), else those :func:`affordable`."""
    if wanted is None:
        return affordable(ctx, params, macs)
    hits = [i for i, c in enumerate(configs) if c == wanted]
    if not hits:
        raise ValueError(
            f"overrides[{ctx.name!r}] asks {method} for {wanted!r}, which does not fit layer "
            f"{ctx.name!r} (weight shape {tuple(ctx.module.weight.shape)})"
        )
    return np.array(hits[:1], dtype=np.int64)


def conv_geometry(module: nn.Module, input_shape: Sequence[int]):
    """``(input spatial size, output spatial size, (left, right) padding per axis)``."""
    n = len(module.kernel_size)
    spatial = tuple(int(s) for s in input_shape[-n:])
    pads = resolve_padding(module.padding, module.kernel_size, module.stride, module.dilation)
    out = conv_output_shape(spatial, module.kernel_size, module.stride, pads, module.dilation)
    return spatial, out, pads


def linear_rows(input_shape: Sequence[int]) -> int:
    """Rows a linear layer multiplies for one call on ``input_shape`` (batch 1 per sample)."""
    return math.prod(input_shape[:-1]) if len(input_shape) > 1 else 1


def affordable(ctx: LayerContext, params: np.ndarray, macs: np.ndarray) -> np.ndarray:
    """Indices of the configurations within ``ctx``'s parameter and MAC limits; the one with
    the fewest parameters is always kept, so the planner can say how far a model can shrink."""
    params, macs = np.asarray(params), np.asarray(macs)
    keep = params <= ctx.max_params()
    if ctx.max_macs is not None:
        keep &= macs <= ctx.max_macs
    if len(params):
        keep[int(np.lexsort((macs, params))[0])] = True
    return np.flatnonzero(keep)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    w = weight.detach().double()
    total = float(torch.linalg.vector_norm(w))
    if total == 0.0:
        return 0.0
    return float(torch.linalg.vector_norm(w - approx.double().to(w.device))) / total


def whitening_covariance(
    entry: LayerPlan, input_covariance: torch.Tensor | None
) -> torch.Tensor | None:
    """The covariance a data-aware entry (``settings["init"] == "whitened"``) is decomposed
    with, ``None`` for a plain entry; an error naming the layer when a data-aware entry comes
    without one."""
    if entry.settings.get("init") != "whitened":
        return None
    if input_covariance is None:
        raise ValueError(
            f"layer {entry.name!r} is planned with factors from calibration data: pass "
            "calibration= to apply_ (or plan without calibration)"
        )
    return input_covariance


def data_aware_error(
    entry: LayerPlan, weight: torch.Tensor, approx: torch.Tensor, input_covariance: torch.Tensor
) -> float:
    """Relative weight error of ``approx``; records its relative output error on the
    calibration data (full covariance) as ``entry.settings["output_error"]``."""
    entry.settings["output_error"] = round(output_error(weight, approx, input_covariance), 6)
    return relative_error(weight, approx.reshape(weight.shape))


def conv_like(
    module: nn.Module,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence[int],
    *,
    stride: Sequence[int] | int = 1,
    padding: Sequence[int] | int | str = 0,
    dilation: Sequence[int] | int = 1,
    groups: int = 1,
    bias: bool = False,
    padding_mode: str = "zeros",
) -> nn.Module:
    """A plain ``nn.Conv{n}d`` with ``module``'s dimensionality, device and dtype."""
    w = module.weight
    return _CONV[len(module.kernel_size)](
        in_channels,
        out_channels,
        tuple(kernel_size),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=padding_mode,
        device=w.device,
        dtype=w.dtype,
    )


def linear_like(module: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    w = module.weight
    return nn.Linear(in_features, out_features, bias=bias, device=w.device, dtype=w.dtype)


@torch.no_grad()
def load(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy ``weight`` (reshaped to the layer's) and ``bias`` into ``layer``."""
    layer.weight.copy_(weight.reshape(layer.weight.shape))
    if bias is not None:
        layer.bias.copy_(bias)


def setting(entry_settings: dict, key: str, method: str, name: str) -> object:
    if key not in entry_settings:
        raise ValueError(
            f"plan layer {name!r} ({method}) has no {key!r} in its settings: {entry_settings!r}"
        )
    return entry_settings[key]


def positive_int(value: object, what: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{what} {value} exceeds its largest meaningful value {upper}")
    return int(value)


class Stages(ReconstructedWeight, nn.Sequential):
    """The layers that replace one dense layer, run in order, with the ``weight`` of the dense
    layer they stand for (``groups`` of it), read-only and built on each read, for parents
    that read their child's weight (T5's ``wo.weight.dtype``). Biases are not in it."""

    def __init__(self, *stages: nn.Module, groups: int = 1) -> None:
        super().__init__(*stages)
        self.dense_groups = groups

    def reconstruct_weight(self) -> torch.Tensor:
        """The stages' weights composed: ``(out, in/groups, *kernel)``, as the dense layer's."""
        composed = None
        for stage in self:
            weight = _block_diagonal(stage.weight, getattr(stage, "groups", 1))
            composed = weight if composed is None else _compose(composed, weight)
        return _diagonal_blocks(composed, self.dense_groups)


def _block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped weight ``(n, m/g, *K)`` as the ungrouped ``(n, m, *K)`` that computes the same:
    each group's block on the diagonal, zeros elsewhere."""
    if groups == 1:
        return weight
    n, per_group, *kernel = weight.shape
    full = weight.new_zeros(groups, n // groups, groups, per_group, *kernel)
    index = torch.arange(groups, device=weight.device)
    full[index, :, index] = weight.reshape(groups, n // groups, per_group, *kernel)
    return full.reshape(n, groups * per_group, *kernel)


def _diagonal_blocks(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of :func:`_block_diagonal`: the ``groups`` diagonal blocks, stacked."""
    if groups == 1:
        return weight
    n, m, *kernel = weight.shape
    blocks = weight.reshape(groups, n // groups, groups, m // groups, *kernel)
    index = torch.arange(groups, device=weight.device)
    return blocks[index, :, index].reshape(n, m // groups, *kernel)


def _compose(first: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """The weight of ``first``'s layer followed by ``then``'s: ``(n, m, *K) ∘ (m, c, *K)``. The
    two kernels may not both span one axis (a stage's kernel is 1 along the other's axes, as
    pointwise stages and CP's per-axis stages are), so composing them is a product."""
    if any(a > 1 and b > 1 for a, b in zip(first.shape[2:], then.shape[2:], strict=True)):
        raise ValueError(f"cannot compose kernels {tuple(then.shape[2:])} and "
                         f"{tuple(first.shape[2:])}: both span one axis")
    kernel = [max(a, b) for a, b in zip(first.shape[2:], then.shape[2:], strict=True)]
    return torch.einsum("nm...,mc...->nc...", then.expand(*then.shape[:2], *kernel),
                        first.expand(*first.shape[:2], *kernel))
