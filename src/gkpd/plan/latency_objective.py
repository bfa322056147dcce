"""``objective="latency"``: time the configurations of each layer on this machine and keep the
fastest one within the plan's error and size budget.

Configurations of equal size differ in forward time by orders of magnitude (oneDNN is fast on
some conv shapes and slow on others; some splits need activation permutes), so the planner
measures instead of modelling. Timings are per layer configuration at the layer's input size,
interleaved round by round with the dense layer (the machine's load then hits both alike),
and cached on disk keyed by torch version, device, CPU model, dtype, thread count and shapes.
The timing itself (interleaved rounds, the cache file) is :mod:`gkpd.timing`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from gkpd.counting import ORDERS
from gkpd.layers.base import CHANNEL_PATHS, WEIGHT_PATH
from gkpd.layers.conv import conv_channel_paths
from gkpd.layout import check_layout, to_layout
from gkpd.methods.gkpd import GKPD, KroneckerConfig, order_macs
from gkpd.plan.schema import LayerPlan
from gkpd.timing import LatencyCache, environment_key, time_interleaved

log = logging.getLogger(__name__)

__all__ = ["LayerTimer", "Option", "Timed", "fastest_within_budget", "runnable"]

_PROBE_MARGIN = 4.0
_MIN_SECONDS = 0.05  # per option, spread over its rounds
_STALE = 0.25  # a cached dense time off by more: the layer is timed again


@dataclass(frozen=True)
class Option:
    """One way to run a layer: a GKPD configuration and the path it runs on."""

    config: KroneckerConfig  # a plain (a_shape, b_shape, rank, path) tuple also works
    path: str  # a stage order, a channel path or "weight"


class LayerTimer:
    """Times options of layers at a batch size in a memory layout (4-d/5-d inputs only; see
    :mod:`gkpd.layout`), with a shared cache; ``measured`` and ``cached`` count the options
    timed and those taken from the cache, ``stale`` the layers whose cached timings were
    dropped (see :meth:`times`). ``channels_last=True`` is ``layout="channels_last"``."""

    def __init__(self, batch: int, cache: LatencyCache, *, layout: str = "contiguous",
                 channels_last: bool = False) -> None:
        self.batch = batch
        self.cache = cache
        self.layout = "channels_last" if channels_last else check_layout(layout)
        self.measured = 0
        self.cached = 0
        self.stale = 0

    def _key(self, env: str, module: nn.Module, input_shape: Sequence[int], option: Option):
        config = KroneckerConfig(*option.config)
        what = f"a={config.a_shape} r={config.rank}"
        if option.path == WEIGHT_PATH:
            what = "dense"  # the weight path runs the dense op, whatever the factors
        shape = (self.batch, *input_shape[1:])
        layout = " | channels_last" if self._channels_last(input_shape) else ""
        return f"{env} | {module!r} | {shape} | {what} | {option.path}{layout}"

    def _channels_last(self, input_shape: Sequence[int]) -> bool:
        return self.layout == "channels_last" and len(input_shape) in (4, 5)

    def times(
        self, module: nn.Module, input_shape: Sequence[int], options: Sequence[Option]
    ) -> dict[Option, float]:
        """Seconds per call of each option on an input of ``input_shape`` at ``self.batch``.

        Cached timings are used while the dense reference (the ``"weight"`` option) still
        runs within ``_STALE`` of its cached time; otherwise the machine is not in the state
        they were taken in (load, frequency, another process's memory traffic change the
        options' relative speeds, not only their scale) and the layer's options are timed
        again."""
        weight = module.weight
        env = environment_key(weight.device, weight.dtype)
        keys = {o: self._key(env, module, input_shape, o) for o in options}
        result = {o: self.cache.get(k) for o, k in keys.items()}
        missing = [o for o, t in result.items() if t is None]
        reference = next((o for o in options if o.path == WEIGHT_PATH), None)
        if reference is not None and reference not in missing and len(missing) < len(options):
            now = self._time(module, input_shape, [reference])[reference]
            if abs(now / result[reference] - 1) > _STALE:
                log.info("latency: the dense %s now takes %.3g ms, %.3g ms when cached: timing "
                         "its options again", module, now * 1e3, result[reference] * 1e3)
                self.stale += 1
                missing = list(options)
        self.cached += len(options) - len(missing)
        if missing:
            timed = self._time(module, input_shape, missing)
            for o in missing:
                result[o] = timed[o]
                self.cache.put(keys[o], timed[o])
            self.measured += len(missing)
            self.cache.save()  # an interrupted plan keeps what it timed
        return result  # type: ignore[return-value]

    def _time(self, module: nn.Module, input_shape: Sequence[int],
              options: Sequence[Option]) -> dict[Option, float]:
        weight = module.weight
        x = torch.randn(self.batch, *input_shape[1:], device=weight.device, dtype=weight.dtype)
        layers = {o: runnable(module, o) for o in options}
        if self._channels_last(input_shape):
            x = to_layout(x, self.layout)
            # a copy of the caller's module only (the weight path); the others are new
            layers = {o: (copy.deepcopy(m) if m is module else m)._apply(
                lambda t: to_layout(t, self.layout)) for o, m in layers.items()}
        calls = {o: (lambda m=m: m(x)) for o, m in layers.items()}
        # one call each first: an option several times slower than the fastest cannot win
        # and keeps that time (the slowest batch-folded splits run ~100x dense)
        timed = time_interleaved(calls, rounds=1, warmup=1)
        fastest = min(timed.values())
        close = {o: c for o, c in calls.items() if timed[o] <= _PROBE_MARGIN * fastest}
        timed.update(time_interleaved(close, min_seconds=_MIN_SECONDS))
        return timed


def runnable(module: nn.Module, option: Option) -> nn.Module:
    """A module that runs like ``option`` would (fresh factors: timing needs only shapes)."""
    if option.path == WEIGHT_PATH:
        return module  # the weight path runs the dense op with a cached weight
    config = KroneckerConfig(*option.config)
    entry = LayerPlan("timing", type(module).__name__, tuple(module.weight.shape), (), 0, 0,
                      settings=config.to_settings())
    layer = GKPD().build(module, entry, decompose=False)
    layer.path = option.path
    return layer.eval()


def _paths(module: nn.Module, config: KroneckerConfig) -> tuple[str, ...]:
    """The stage orders and channel paths a GKPD configuration of ``module`` can run."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return ORDERS
    config = KroneckerConfig(*config)
    return (*ORDERS, *conv_channel_paths(config.a_shape, config.b_shape, module.groups))


@dataclass
class Timed:
    """The option a layer runs with, its time, and the dense layer's time, per call."""

    pick: int  # index into the layer's candidate table
    path: str
    seconds: float
    dense_seconds: float
    # on the weight path: the same configuration's fastest factored path, timed alone
    factored: Timed | None = None


def fastest_within_budget(
    contexts: Sequence,
    tables: Sequence,
    picks: Sequence[int | None],
    *,
    timer: LayerTimer,
    error_slack: float,
    fits: Callable[[int], bool],
    stop: Callable[[], bool] | None = None,
) -> list[Timed | None]:
    """For each picked layer, the fastest way to run it whose error is at most
    ``(1 + error_slack)`` times the picked configuration's and whose size keeps the whole
    model within budget (``fits(extra_params)`` for the sum of size changes).

    Options are the configurations (per factor shape, the largest rank no bigger than the
    pick: the best error that shape has there) in both stage orders and on the channel paths
    their shapes allow, and the pick on the ``"weight"`` path (dense speed). Paths with more
    MACs than the dense layer are left out (the pick's own path excepted): the weight path
    beats them, and they are the slow ones to time (in ResNet-50's first 1x1 conv, 9-30x the
    dense MACs and 1-12 s per call at batch 8). Layers move greedily, largest time saving
    first.
    ``tables`` are full candidate tables: a slightly worse but much faster configuration is
    off the Pareto front. ``stop`` is asked before each layer is timed: once it says True,
    the layers left are not timed and keep their picks (``None``).
    """
    result: list[Timed | None] = [None] * len(picks)
    offers = []  # (saving, layer, Timed, extra params)
    for i, (ctx, table, pick) in enumerate(zip(contexts, tables, picks, strict=True)):
        if pick is None or isinstance(ctx.module, nn.Embedding):  # a lookup: one way to run
            continue
        if stop is not None and stop():
            break
        bound = table.error[pick] * (1 + error_slack) + 1e-12
        configs = [KroneckerConfig(*c) for c in table.configs]
        best: dict[tuple, int] = {}  # per A-factor shape, the largest config within bounds
        for j, config in enumerate(configs):
            if table.params[j] <= table.params[pick] and table.error[j] <= bound:
                a = config.a_shape
                if a not in best or table.params[j] > table.params[best[a]]:
                    best[a] = j
        best[configs[pick].a_shape] = pick
        options = {(pick, WEIGHT_PATH): Option(table.configs[pick], WEIGHT_PATH)}
        for j in best.values():
            config = configs[j]
            macs = order_macs(ctx.module, ctx.input_shape, config.a_shape, config.b_shape,
                              config.rank)  # per stage order
            for path in _paths(ctx.module, config):
                if (j, path) == (pick, configs[pick].path) or (
                    macs[CHANNEL_PATHS.get(path, path)] <= ctx.dense_macs
                ):
                    options[(j, path)] = Option(table.configs[j], path)
        times = timer.times(ctx.module, ctx.input_shape, list(options.values()))
        dense = times[options[(pick, WEIGHT_PATH)]]
        timed = [Timed(j, path, times[o], dense) for (j, path), o in options.items()]
        current = min((t for t in timed if t.pick == pick and t.path != WEIGHT_PATH),
                      key=lambda t: t.seconds)
        result[i] = current
        for t in timed:
            if t.seconds < current.seconds:
                extra = int(table.params[t.pick]) - int(table.params[pick])
                offers.append((current.seconds - t.seconds, i, t, extra))
    extra_total = 0
    moved = set()
    for _, i, t, extra in sorted(offers, key=lambda o: -o[0]):
        if i not in moved and fits(extra_total + extra):
            # the weight path is offered for the pick only: its factored path is `current`
            result[i] = replace(t, factored=result[i]) if t.path == WEIGHT_PATH else t
            extra_total += extra
            moved.add(i)
    return result
