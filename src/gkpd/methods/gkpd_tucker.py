"""``gkpd_tucker``: Tucker-2 channel projections around a Kronecker-sum core.

``W (F, C, *K) ≈ U_out · (Σ_r A_r ⊗ B_r) · U_inᵀ``: the channel modes are projected as in
Tucker-2 (``U_in (C, r_in)``, ``U_out (F, r_out)``, orthonormal, from the HOSVD), and the core
``G (r_out, r_in, *K)`` that Tucker-2 keeps dense is itself a GKPD. The layer becomes a 1×1
conv ``C → r_in`` (no bias), a Kronecker conv ``r_in → r_out`` with the original kernel,
stride, padding, dilation and padding mode, and a 1×1 conv ``r_out → F`` with the bias — the
"Kronecker sums combined with channel projections" of issue #12: at the size of a Tucker-2
layer, the compressed core leaves room for larger channel ranks.

Errors are exact and cost one small spectrum per (channel ranks, core split): the
projections are orthonormal, so ``‖W − Ŵ‖² = (‖W‖² − ‖G‖²) + ‖G − Ĝ‖²``, where ``G`` (the
HOSVD core of ranks ``r_in, r_out``) is a corner of the fully rotated kernel and ``‖G − Ĝ‖²``
is the tail of the core's rearranged spectrum. Channel ranks are searched on a grid
(:func:`rank_grid`: every rank to 8, then coarser), core splits as GKPD searches them.

Settings of a plan entry: ``{"ranks": [r_in, r_out], "a_shape", "b_shape", "rank", "path"}``
(the core's GKPD as :class:`gkpd.methods.gkpd.KroneckerConfig` writes it); per-layer
override: ``{"ranks": [...]}``, optionally with the core's ``"a_shape"`` (and ``"rank"``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from gkpd.decompose import check_factor_shapes, check_rank, decompose
from gkpd.layers.conv import on_channel_path
from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.gkpd import KroneckerConfig, build_kronecker
from gkpd.methods.gkpd_search import LayerShape, make_split, split_table, tail_errors
from gkpd.methods.lowrank import (
    conv_geometry,
    conv_like,
    layer_reason,
    load,
    override_settings,
    relative_error,
    setting,
)
from gkpd.methods.tucker import parse_ranks, reconstruct
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan


def rank_grid(n: int) -> list[int]:
    """The channel ranks searched for a mode of ``n`` channels: every rank up to 8, even
    ranks up to 16, multiples of 4 up to 32, of 8 beyond, and ``n`` (coarse where a step
    changes the size little, and rich in divisors, which the core's splits need)."""
    grid = {r for r in range(1, 9)} | set(range(10, 17, 2)) | set(range(20, 33, 4))
    grid |= set(range(40, n + 1, 8)) | {n}
    return sorted(r for r in grid if r <= n)


def hosvd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_in (C, C'), rotated (F', C', *K), u_out (F, F'))`` in float64: the leading left
    singular vectors of both channel unfoldings and the kernel rotated by them, whose corner
    ``[:r_out, :r_in]`` is the HOSVD core of those ranks."""
    w = weight.detach().double()

    def leading(mode: int) -> torch.Tensor:
        unfolded = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        return torch.linalg.svd(unfolded, full_matrices=False).U

    u_out, u_in = leading(0), leading(1)
    return u_in, torch.einsum("fc...,fo,ci->oi...", w, u_out, u_in), u_out


class TuckerKroneckerConfig(NamedTuple):
    """Channel ranks and the core's GKPD of one ``gkpd_tucker`` configuration."""

    r_in: int
    r_out: int
    core: KroneckerConfig

    def to_settings(self) -> dict[str, Any]:
        return {"ranks": [int(self.r_in), int(self.r_out)], **self.core.to_settings()}


class GKPDTucker(LayerMethod):
    name = "gkpd_tucker"

    def supports(self, module: nn.Module) -> str | None:
        reason = layer_reason(module, self.name, linear=False, grouped=False)
        if reason:
            return reason
        f, c = module.weight.shape[:2]
        if c + f >= module.weight.numel():
            return (
                f"channel projections of rank 1 have {c + f} weights, no fewer than the dense "
                f"layer's {module.weight.numel()}"
            )
        return None

    def family(self, config: TuckerKroneckerConfig) -> tuple:
        return config.r_in, config.r_out, config.core.a_shape

    # ------------------------------------------------------------------ planning

    def _wanted(self, ctx: LayerContext) -> dict[str, Any]:
        given = override_settings(ctx, self.name, ("ranks", "a_shape", "rank"))
        if ("a_shape" in given or "rank" in given) and "ranks" not in given:
            raise ValueError(f"overrides[{ctx.name!r}] gives the core's a_shape or rank "
                             "without its channel ranks (\"ranks\": [r_in, r_out])")
        if "rank" in given and "a_shape" not in given:
            raise ValueError(f"overrides[{ctx.name!r}] gives a rank without an a_shape")
        if "ranks" in given:
            given["ranks"] = parse_ranks(ctx.module.weight.shape, given["ranks"],
                                          f"overrides[{ctx.name!r}]['ranks']")
        return given

    def candidates(self, ctx: LayerContext) -> Candidates:
        module = ctx.module
        given = self._wanted(ctx)
        f, c, *k = module.weight.shape
        spatial, out, _ = conv_geometry(module, ctx.input_shape)
        u_in, rotated, u_out = hosvd(module.weight)
        total = float(rotated.square().sum())
        if "ranks" in given:
            pairs = [given["ranks"]]
        else:
            kk = math.prod(k)
            pairs = [(ri, ro) for ro in rank_grid(u_out.shape[1]) for ri in rank_grid(u_in.shape[1])
                     if ri <= ro * kk and ro <= ri * kk]
        budget = ctx.max_params() - ctx.bias_params
        parts = []
        for r_in, r_out in pairs:
            projection_params = c * r_in + f * r_out
            projection_macs = c * r_in * math.prod(spatial) + f * r_out * math.prod(out)
            core_shape = LayerShape(
                "conv", (r_out, r_in, *k), (1, r_in, *spatial), 0,
                (module.stride, module.padding, module.dilation, 1, module.padding_mode),
            )
            core_budget = budget - projection_params
            core_macs = None if ctx.max_macs is None else ctx.max_macs - projection_macs
            splits = self._core_splits(ctx, given, core_shape, core_budget, core_macs, r_in, r_out)
            if not splits:
                continue
            core = rotated[:r_out, :r_in]
            lost = max(total - float(core.square().sum()), 0.0) / total if total else 0.0
            for s in splits:
                tails, exact = tail_errors(core, s.a, s.cap, total)
                ranks = np.arange(1, s.cap + 1)
                errors = np.sqrt(lost + tails**2)
                if "rank" in given:
                    ranks, errors = ranks[-1:], errors[-1:]
                path = on_channel_path(s.order, s.a, s.b, 1)
                parts.append(Candidates(
                    projection_params + ranks * s.per_rank + ctx.bias_params,
                    projection_macs + ranks * s.macs_per_rank,
                    errors,
                    [TuckerKroneckerConfig(r_in, r_out, KroneckerConfig(s.a, s.b, int(r), path))
                     for r in ranks],
                    exact=np.full(len(ranks), exact),
                ))
        return Candidates.concatenate(parts) if parts else Candidates.empty()

    def _core_splits(self, ctx, given, core_shape, budget, max_macs, r_in, r_out):
        """The core's splits to search: the override's one, else those the budget leaves a
        rank (restricted to the families a layer of the same shape kept)."""
        if "a_shape" in given:
            a = tuple(given["a_shape"])
            try:
                _, b = check_factor_shapes(core_shape.weight_shape, a)
                split = make_split(core_shape, a, budget, max_macs)
                cap = check_rank(given["rank"], a, b) if "rank" in given else max(split.cap, 1)
            except (TypeError, ValueError) as error:
                raise ValueError(f"override for layer {ctx.name!r}: the core of ranks "
                                 f"({r_in}, {r_out}): {error}") from None
            return [split._replace(cap=cap)]
        if budget <= 0:
            return []
        splits = [s for s in split_table(core_shape, budget, max_macs) if s.cap >= 1]
        if ctx.families is not None:
            splits = [s for s in splits if (r_in, r_out, s.a) in ctx.families]
        return splits

    def describe(self, ctx: LayerContext, config: TuckerKroneckerConfig, entry: LayerPlan) -> None:
        entry.settings = config.to_settings()

    def _config(self, module: nn.Module, entry: LayerPlan) -> TuckerKroneckerConfig:
        """The configuration an entry's settings hold, checked (a plan file may have been
        edited by hand)."""
        ranks = setting(entry.settings, "ranks", self.name, entry.name)
        r_in, r_out = parse_ranks(module.weight.shape, ranks,
                                  f"gkpd_tucker ranks of layer {entry.name!r}")
        core = KroneckerConfig.of(entry)
        core_shape = (r_out, r_in, *module.weight.shape[2:])
        try:
            check_factor_shapes(core_shape, core.a_shape, core.b_shape)
            check_rank(core.rank, core.a_shape, core.b_shape)
        except (TypeError, ValueError) as error:
            raise ValueError(f"layer {entry.name!r}: the core {core_shape}: {error}") from None
        return TuckerKroneckerConfig(r_in, r_out, core)

    def _projections(self, module: nn.Module, config: TuckerKroneckerConfig):
        """``(u_in (C, r_in), core (r_out, r_in, *K), u_out (F, r_out))`` in float64."""
        u_in, rotated, u_out = hosvd(module.weight)
        r_in, r_out, _ = config
        return u_in[:, :r_in], rotated[:r_out, :r_in].contiguous(), u_out[:, :r_out]

    def exact_error(self, module: nn.Module, entry: LayerPlan) -> float:
        config = self._config(module, entry)
        u_in, core, u_out = self._projections(module, config)
        approx = decompose(core, config.core.a_shape, config.core.b_shape, config.core.rank)
        return relative_error(module.weight, reconstruct(u_in, approx.reconstruct(), u_out))

    # ------------------------------------------------------------------ applying

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        config = self._config(module, entry)
        r_in, r_out, core = config
        point = (1,) * len(module.kernel_size)
        first = conv_like(module, module.in_channels, r_in, point)
        dense_core = conv_like(
            module, r_in, r_out, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, padding_mode=module.padding_mode,
        )
        last = conv_like(module, r_out, module.out_channels, point, bias=module.bias is not None)
        if decompose:
            u_in, core_weight, u_out = self._projections(module, config)
            load(first, u_in.T)
            load(dense_core, core_weight)
            load(last, u_out, None if module.bias is None else module.bias.detach())
        return nn.Sequential(first, build_kronecker(dense_core, core, decompose=decompose), last)
