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

import functools
import math
from typing import Any, NamedTuple

import numpy as np
from torch import nn

from gkpd.decompose import check_factor_shapes, check_rank, decompose, full_rank, rearrange
from gkpd.layers.conv import on_channel_path
from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.gkpd import KroneckerConfig, build_kronecker
from gkpd.methods.gkpd_search import LayerShape, factor_shapes, matrix_tail_errors, spectrum_key
from gkpd.methods.lowrank import (
    Stages,
    conv_geometry,
    conv_like,
    layer_reason,
    load,
    override_settings,
    relative_error,
    setting,
)
from gkpd.methods.tucker import corner_energies, hosvd, parse_ranks, reconstruct
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan


def rank_grid(n: int) -> list[int]:
    """The channel ranks searched for a mode of ``n`` channels: every rank up to 8, then four
    per octave (10, 12, 14, 16, 20, …, 28, 32, 40, …), and ``n`` — coarse where a step
    changes the size little, and rich in divisors, which the core's splits need."""
    grid, step = set(range(1, 9)), 2
    while 8 * step < n:
        grid |= set(range(4 * step + step, 8 * step + 1, step))
        step *= 2
    return sorted(r for r in grid | {n} if r <= n)


def channel_pairs(c: int, f: int, kernel: int) -> list[tuple[int, int]]:
    """``(r_in, r_out)`` on the grids of both modes that Tucker-2 allows
    (``r_in ≤ r_out·∏K``, ``r_out ≤ r_in·∏K``) and that keep the two modes' shares
    ``r_in/C`` and ``r_out/F`` within a factor 2 of each other: the search leaves out
    projections that keep most of one mode and little of the other (never the best at any
    size on ResNet-32's layers, and a third of the pairs)."""
    return [(ri, ro) for ro in rank_grid(f) for ri in rank_grid(c)
            if ri <= ro * kernel and ro <= ri * kernel and 0.5 <= (ri * f) / (ro * c) <= 2]


# errors within this of each other tie on the planner's Pareto front (Candidates.pareto)
_TIE = 1e-9


class _CoreSplit(NamedTuple):
    """One split of a core shape: factor shapes, parameters per rank, full rank, and the key
    of its spectrum (a split and its mirror image share one, as in GKPD's tables)."""

    a: tuple[int, ...]
    b: tuple[int, ...]
    per_rank: int
    full_rank: int
    spectrum: tuple[int, ...]


@functools.lru_cache(maxsize=4096)
def _core_splits(core_shape: tuple[int, ...]) -> tuple[_CoreSplit, ...]:
    """Every split of a core shape (both factors larger than one entry)."""
    return tuple(_CoreSplit(a, b, math.prod(a) + math.prod(b), full_rank(a, b),
                            spectrum_key(a, b)) for a, b in factor_shapes(core_shape))


@functools.lru_cache(maxsize=65536)
def _rank_one(core: LayerShape, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[str, int]:
    """``(stage order, MACs per rank)`` of a core split (GKPD's counting)."""
    return core.rank_one(a, b)


class _Front:
    """The (params, error) Pareto front of the candidates found so far."""

    def __init__(self) -> None:
        self.params = np.zeros(0, dtype=np.int64)
        self.error = np.zeros(0)

    def add(self, params: np.ndarray, error: np.ndarray) -> None:
        p = np.concatenate([self.params, params])
        e = np.concatenate([self.error, error])
        order = np.lexsort((e, p))
        p, e = p[order], e[order]
        keep = e < np.minimum.accumulate(np.concatenate([[np.inf], e[:-1]]))
        self.params, self.error = p[keep], e[keep]

    def best_within(self, params: np.ndarray) -> np.ndarray:
        """The least error of a found candidate with at most ``params`` parameters."""
        if not len(self.params):
            return np.full(len(params), np.inf)
        at = np.searchsorted(self.params, params, side="right")
        return np.where(at > 0, self.error[np.maximum(at - 1, 0)], np.inf)

    def beats(self, params: int, error: float) -> bool:
        """Whether a found candidate has at most ``params`` and an error below ``error``."""
        return bool(self.best_within(np.array([params]))[0] < error - _TIE)

    def near(self, params: np.ndarray, error: np.ndarray) -> np.ndarray:
        """Which of these candidates are on the front or tie with it."""
        return error <= self.best_within(params) + _TIE


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
        _, rotated, _ = hosvd(module.weight)
        total = float(rotated.square().sum())
        captured = corner_energies(rotated)
        if "ranks" in given:
            pairs = [given["ranks"]]
        else:
            pairs = channel_pairs(rotated.shape[1], rotated.shape[0], math.prod(k))
            # the cheapest projections first, so that the front prunes the dearer ones early
            pairs.sort(key=lambda p: (c * p[0] + f * p[1], -captured[p[1] - 1, p[0] - 1]))
        budget = ctx.max_params() - ctx.bias_params
        conv = (module.stride, module.padding, module.dilation, 1, module.padding_mode)
        rotated32 = rotated.float()
        front = _Front()
        found: list[tuple] = []
        for r_in, r_out in pairs:
            projection_params = c * r_in + f * r_out
            projection_macs = c * r_in * math.prod(spatial) + f * r_out * math.prod(out)
            core_shape = LayerShape("conv", (r_out, r_in, *k), (1, r_in, *spatial), 0, conv)
            core_macs = None if ctx.max_macs is None else ctx.max_macs - projection_macs
            splits = self._splits(ctx, given, core_shape, budget - projection_params,
                                  core_macs, r_in, r_out)
            if not splits:
                continue
            lost = max(total - float(captured[r_out - 1, r_in - 1]), 0.0) / total if total else 0.0
            smallest = projection_params + ctx.bias_params + min(s.per_rank for s, _ in splits)
            if "ranks" not in given and front.beats(smallest, math.sqrt(lost)):
                continue  # every configuration of these ranks is off the Pareto front
            core = rotated32[:r_out, :r_in]
            spectra: dict[tuple, tuple[np.ndarray, bool]] = {}
            for s, cap in sorted(splits, key=lambda sc: -sc[1]):  # a spectrum's largest cap first
                if s.spectrum not in spectra:
                    spectra[s.spectrum] = (
                        matrix_tail_errors(rearrange(core, s.a, s.b), cap, total) if total
                        else (np.zeros(cap), True)
                    )
                tails, exact = spectra[s.spectrum]
                ranks = np.arange(1, cap + 1)
                errors = np.sqrt(lost + tails[:cap] ** 2)
                if "rank" in given:
                    ranks, errors = ranks[-1:], errors[-1:]
                params = projection_params + ranks * s.per_rank + ctx.bias_params
                found.append((params, errors, ranks, r_in, r_out, s, core_shape,
                              projection_macs, exact))
                front.add(params, errors)
        return self._table(found, front)

    @staticmethod
    def _table(found: list[tuple], front: _Front) -> Candidates:
        """The candidates within a tie of the Pareto front (the planner keeps no others), with
        their MACs and configurations made only for those."""
        parts = []
        for params, errors, ranks, r_in, r_out, s, core_shape, projection_macs, exact in found:
            keep = front.near(params, errors)
            if not keep.any():
                continue
            order, macs_per_rank = _rank_one(core_shape, s.a, s.b)
            path = on_channel_path(order, s.a, s.b, 1)
            parts.append(Candidates(
                params[keep], projection_macs + ranks[keep] * macs_per_rank, errors[keep],
                [TuckerKroneckerConfig(r_in, r_out, KroneckerConfig._make((s.a, s.b, r, path)))
                 for r in ranks[keep].tolist()],
                exact=np.full(int(keep.sum()), exact),
            ))
        return Candidates.concatenate(parts) if parts else Candidates.empty()

    def _splits(self, ctx, given, core_shape, budget, max_macs, r_in, r_out):
        """``(split, most ranks)`` of the core to search: the override's one (at its rank, or
        the budget's, at least 1), else every split that the parameter and MAC budget leave a
        rank (restricted to the families a layer of the same shape kept)."""
        shape = core_shape.weight_shape
        if "a_shape" in given:
            a = tuple(given["a_shape"])
            try:
                _, b = check_factor_shapes(shape, a)
                if "rank" in given:
                    cap = check_rank(given["rank"], a, b)
            except (TypeError, ValueError) as error:
                raise ValueError(f"override for layer {ctx.name!r}: the core of ranks "
                                 f"({r_in}, {r_out}): {error}") from None
            split = next((s for s in _core_splits(shape) if s.a == a), None)
            if split is None:
                raise ValueError(f"override for layer {ctx.name!r}: a_shape {a} leaves one "
                                 f"factor of the core {shape} a single entry")
            if "rank" not in given:
                cap = max(min(split.full_rank, max(budget, 0) // split.per_rank), 1)
            return [(split, cap)]
        if budget <= 0:
            return []
        splits = []
        for s in _core_splits(shape):
            if ctx.families is not None and (r_in, r_out, s.a) not in ctx.families:
                continue
            cap = min(s.full_rank, budget // s.per_rank)
            if max_macs is not None and cap >= 1:
                per_rank = _rank_one(core_shape, s.a, s.b)[1]
                if per_rank > 0:
                    cap = min(cap, max(max_macs, 0) // per_rank)
            if cap >= 1:
                splits.append((s, cap))
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
        return Stages(first, build_kronecker(dense_core, core, decompose=decompose), last)
