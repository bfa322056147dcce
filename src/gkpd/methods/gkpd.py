"""GKPD: each conv/linear weight as a sum of Kronecker products (docs/design.md §1–§5).

Per-layer override: ``{"a_shape": (...)}`` (that split only), optionally with ``"rank"``.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from gkpd.counting import (
    best_order,
    group_split,
    kronecker_conv_order_macs,
    kronecker_linear_order_macs,
)
from gkpd.decompose import b_shape_for, check_rank, full_rank, rearrange
from gkpd.layers import KroneckerConvNd, KroneckerLinear
from gkpd.layers.conv import (
    KroneckerConv1d,
    KroneckerConv2d,
    KroneckerConv3d,
    on_channel_path,
)
from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.lowrank import override_settings
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan
from gkpd.whiten import WhitenedSplit, decompose_whitened, output_error

_KRONECKER_CONV = {1: KroneckerConv1d, 2: KroneckerConv2d, 3: KroneckerConv3d}
# Below this many rows/columns, or when most of the spectrum is wanted, an exact SVD is
# cheaper than a randomized one.
_EXACT_SVD_SIDE = 256
_OVERSAMPLE = 10


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _tail_errors(
    weight: torch.Tensor, a_shape: tuple[int, ...], max_rank: int, total: float
) -> np.ndarray:
    """Relative error of the best rank-r GKPD for r = 1 … max_rank (float64); ``total`` is
    ``‖weight‖²`` (the same for every split).

    Where most of the spectrum is wanted, the squared singular values are the eigenvalues
    of the Gram matrix of the rearranged weight's short side (about twice as fast as an SVD;
    absolute error ~1e-7 of the largest, far below the errors compared here). Where only a
    few are wanted from a large matrix, a randomized SVD (one power iteration) estimates them
    from below, so the error here is never optimistic.
    """
    if total == 0.0:
        return np.zeros(max_rank)
    m = rearrange(weight, a_shape).float()
    side = min(m.shape)
    if side <= _EXACT_SVD_SIDE or 4 * (max_rank + _OVERSAMPLE) >= side:
        short = m if m.shape[0] <= m.shape[1] else m.T
        energies = torch.linalg.eigvalsh(short @ short.T).flip(0)[:max_rank].clamp_min(0)
    else:
        _, s, _ = torch.svd_lowrank(m, q=max_rank + _OVERSAMPLE, niter=1)
        energies = s[:max_rank].square()
    captured = np.cumsum(energies.double().numpy())
    return np.sqrt(np.clip(total - captured, 0.0, None) / total)


def _whitened_tail_errors(
    weight: torch.Tensor, cov: torch.Tensor, a_shape: tuple[int, ...], max_rank: int,
    damping: float,
) -> np.ndarray:
    """Relative output error of the best rank-r data-aware GKPD for r = 1 … max_rank, under
    the damped nearest-Kronecker approximation of the input covariance ``cov``."""
    split = WhitenedSplit.from_covariance(
        cov, weight.shape, a_shape, b_shape_for(weight.shape, a_shape), damping=damping
    )
    m = split.whiten(rearrange(weight, a_shape))
    total = float(m.square().sum())
    if total == 0.0:
        return np.zeros(max_rank)
    short = m if m.shape[0] <= m.shape[1] else m.T
    energies = torch.linalg.eigvalsh(short @ short.T).flip(0)[:max_rank].clamp_min(0)
    captured = np.cumsum(energies.numpy())
    return np.sqrt(np.clip(total - captured, 0.0, None) / total)


class KroneckerConfig(NamedTuple):
    """One GKPD configuration of a layer: ``weight ≈ Σ_rank A_r ⊗ B_r`` with factors of
    shapes ``a_shape`` and ``b_shape``, run in stage ``order`` (the cheaper one in MACs)."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    order: str


class GKPD(LayerMethod):
    name = "gkpd"

    def supports(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear) or _is_conv(module):
            if not module.weight.is_floating_point():
                return f"weight dtype {module.weight.dtype} is not floating point"
            return None
        if isinstance(module, nn.modules.conv._ConvNd):
            return "transposed convolutions are not supported"
        return f"{type(module).__name__} is not a conv or linear layer"

    # ------------------------------------------------------------------ planning

    def _rank_one_macs(self, ctx: LayerContext, a: tuple[int, ...], b: tuple[int, ...]):
        """``(order, MACs per unit of rank)`` for one sample at the planner's input size."""
        macs = order_macs(ctx.module, ctx.input_shape, a, b, 1)
        order = best_order(macs)
        return order, macs[order]

    def _splits(self, ctx: LayerContext) -> list[tuple[int, ...]]:
        weight_shape = tuple(ctx.module.weight.shape)
        if "a_shape" in ctx.override:
            a = tuple(ctx.override["a_shape"])
            b = b_shape_for(weight_shape, a)
            self._check_groups(ctx, a, b)
            return [a]
        if ctx.families is not None:
            return sorted(ctx.families)
        total = math.prod(weight_shape)
        splits = []
        for a in itertools.product(*(_divisors(s) for s in weight_shape)):
            if not 1 < math.prod(a) < total:
                continue
            b = tuple(w // x for w, x in zip(weight_shape, a, strict=True))
            if _is_conv(ctx.module) and ctx.module.groups > 1:
                try:
                    group_split(ctx.module.groups, a, b)
                except ValueError:
                    continue
            splits.append(a)
        return splits

    def _check_groups(self, ctx: LayerContext, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        if _is_conv(ctx.module) and ctx.module.groups > 1:
            try:
                group_split(ctx.module.groups, a, b)
            except ValueError as error:
                raise ValueError(f"override for layer {ctx.name!r}: {error}") from error

    def candidates(self, ctx: LayerContext) -> Candidates:
        given = override_settings(ctx, self.name, ("a_shape", "rank"))
        if "rank" in given and "a_shape" not in given:
            raise ValueError(f"overrides[{ctx.name!r}] gives a rank without an a_shape")
        weight = ctx.module.weight.detach()
        weight_shape = tuple(weight.shape)
        bias = ctx.bias_params
        budget = ctx.max_params() - bias
        fixed_rank = ctx.override.get("rank")
        total = float(weight.double().square().sum())
        if ctx.select_by_output and ctx.input_covariance is not None:
            cov, damping = ctx.input_covariance, ctx.damping

            def tail_errors(a, max_rank):
                return _whitened_tail_errors(weight, cov, a, max_rank, damping)
        else:

            def tail_errors(a, max_rank):
                return _tail_errors(weight, a, max_rank, total)

        splits = self._splits(ctx)
        # The smallest configuration is always offered, whatever the budget, so that the
        # planner can say how far the model can shrink.
        smallest = min(splits, key=lambda a: math.prod(a) + math.prod(b_shape_for(weight_shape, a)))
        parts = []
        for a in splits:
            b = b_shape_for(weight_shape, a)
            per_rank = math.prod(a) + math.prod(b)
            order, macs_per_rank = self._rank_one_macs(ctx, a, b)
            if fixed_rank is not None:
                ranks = np.array([check_rank(fixed_rank, a, b)])
                errors = tail_errors(a, int(ranks[0]))[-1:]
            else:
                cap = min(full_rank(a, b), budget // per_rank)
                if ctx.max_macs is not None and macs_per_rank > 0:
                    cap = min(cap, ctx.max_macs // macs_per_rank)
                if cap < 1 and a == smallest:
                    cap = 1
                if cap < 1:
                    continue
                ranks = np.arange(1, cap + 1)
                errors = tail_errors(a, cap)
            parts.append(
                Candidates(
                    ranks * per_rank + bias,
                    ranks * macs_per_rank,
                    errors,
                    [KroneckerConfig(a, b, int(r), order) for r in ranks],
                )
            )
        return Candidates.concatenate(parts)

    def family(self, config: KroneckerConfig) -> tuple[int, ...]:
        return config.a_shape

    def describe(self, ctx: LayerContext, config: KroneckerConfig, entry: LayerPlan) -> None:
        a, b, rank, order = config
        if _is_conv(ctx.module):  # the path the layer will run on order "auto"
            order = on_channel_path(order, a, b, ctx.module.groups)
        entry.a_shape, entry.b_shape, entry.rank, entry.order = a, b, rank, order
        if ctx.input_covariance is not None:
            entry.settings.update(init="whitened", damping=float(ctx.damping))

    def exact_error(
        self, module: nn.Module, entry: LayerPlan, input_covariance: torch.Tensor | None = None
    ) -> float:
        """Relative weight error of the factors ``build`` starts from; with the layer's
        ``input_covariance`` (a data-aware entry) also records their relative output error on
        the calibration data, under the full covariance, as ``settings["output_error"]``."""
        if entry.settings.get("init") == "whitened":
            if input_covariance is None:
                raise ValueError(
                    f"layer {entry.name!r} is planned with whitened factors: its input "
                    "covariance is needed"
                )
            weight = module.weight.detach()
            factors = decompose_whitened(
                weight, input_covariance, entry.a_shape, entry.b_shape, entry.rank,
                damping=entry.settings["damping"],
            )
            approx = factors.reconstruct()
            entry.settings["output_error"] = round(
                output_error(weight, approx, input_covariance), 6
            )
            norm = float(weight.double().norm())
            return float((weight.double() - approx.double()).norm()) / norm if norm else 0.0
        # singular values in the weight's own precision (float32 is ~3x faster than float64
        # on the largest ResNet-50 layers); the sums in float64
        m = rearrange(module.weight.detach(), entry.a_shape)
        total = float(m.double().square().sum())
        if total == 0.0:
            return 0.0
        captured = float(torch.linalg.svdvals(m)[: entry.rank].double().square().sum())
        return math.sqrt(max(total - captured, 0.0) / total)

    # ------------------------------------------------------------------ applying

    def build(
        self, module: nn.Module, entry: LayerPlan, *, decompose: bool,
        input_covariance: torch.Tensor | None = None,
    ) -> nn.Module:
        """The Kronecker layer of ``entry``; a data-aware entry (``settings["init"] ==
        "whitened"``) decomposed with the layer's ``input_covariance``."""
        whitened = entry.settings.get("init") == "whitened"
        if decompose and whitened and input_covariance is None:
            raise ValueError(
                f"layer {entry.name!r} is planned with factors from calibration data: pass "
                "calibration= to apply_ (or plan without calibration)"
            )
        data = (
            {"input_covariance": input_covariance, "damping": entry.settings["damping"]}
            if decompose and whitened else {}
        )
        layer = self._build(module, entry, decompose=decompose, **data)
        if "latency_ms" in entry.settings:  # a latency plan timed this path: run it
            layer.order = entry.order
        return layer

    def _build(
        self, module: nn.Module, entry: LayerPlan, *, decompose: bool, **data: Any
    ) -> nn.Module:
        if isinstance(module, nn.Linear):
            if decompose:
                return KroneckerLinear.from_dense(
                    module, a_shape=entry.a_shape, rank=entry.rank, **data
                )
            w = module.weight
            return KroneckerLinear(
                module.in_features,
                module.out_features,
                module.bias is not None,
                a_shape=entry.a_shape,
                rank=entry.rank,
                device=w.device,
                dtype=w.dtype,
            )
        layer_cls = _KRONECKER_CONV[len(module.kernel_size)]
        if decompose:
            return layer_cls.from_dense(module, a_shape=entry.a_shape, rank=entry.rank, **data)
        w = module.weight
        return layer_cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            a_shape=entry.a_shape,
            rank=entry.rank,
            device=w.device,
            dtype=w.dtype,
        )


def order_macs(
    module: nn.Module, input_shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...],
    rank: int,
) -> dict[str, int]:
    """MACs per stage order of the Kronecker layer (factor shapes ``a``, ``b``, ``rank``)
    that would replace the conv/linear ``module``, for one sample of ``input_shape``
    (batch dim first)."""
    if isinstance(module, nn.Linear):
        rows = math.prod(input_shape[1:-1]) if len(input_shape) > 1 else 1
        return kronecker_linear_order_macs(a, b, rank, batch=rows)
    n = len(module.kernel_size)
    return kronecker_conv_order_macs(
        input_shape[-n:], a, b, rank, stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=module.groups, batch=1,
        padding_mode=module.padding_mode,
    )


def is_kronecker(module: nn.Module) -> bool:
    return isinstance(module, KroneckerConvNd | KroneckerLinear)
