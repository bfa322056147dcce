"""What :func:`gkpd.plan` optimizes besides the size: ``"error"`` (the default: the summed or
uniform relative error of the strategy alone) or :class:`LatencyObjective` (then the fastest
way to run each layer within an error slack, timed on this machine; see
``plan/latency_objective.py``).
"""

from __future__ import annotations

import logging
import numbers
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gkpd.inputs import ModelCall
from gkpd.layers.base import WEIGHT_PATH
from gkpd.layout import check_layout
from gkpd.plan.schema import LayerPlan

log = logging.getLogger(__name__)

OBJECTIVES = ("error", "latency")
# The keywords gkpd.plan took before LatencyObjective, by the field each one sets.
LEGACY_LATENCY_KEYWORDS = {
    "latency_batch": "batch",
    "latency_slack": "slack",
    "latency_cache": "cache",
    "latency_channels_last": "channels_last",
}


@dataclass(frozen=True)
class LatencyObjective:
    """``gkpd.plan(..., objective=LatencyObjective(...))`` (GKPD only): after the strategy's
    allocation, time on this machine at ``batch`` (``None``: the example input's) every
    configuration of each layer whose error is within ``1 + slack`` times the chosen one's and
    that keeps the model within budget, in both stage orders, on the channel paths its factor
    shapes allow and on the reconstructed-weight path, and keep the fastest.

    ``layout``: the memory layouts to time in, ``"auto"`` (NCHW and channels_last where the
    model has 4-d/5-d layer inputs; then the whole model is timed in each, with the dense
    model in each, and the faster layout is kept: ``CompressionPlan.layout``), or one of
    ``gkpd.layout.LAYOUTS``. :func:`gkpd.apply_` makes the compressed model run in the plan's
    layout; callers pass and get NCHW tensors as before. ``channels_last=True`` (deprecated)
    is ``layout="channels_last"``. Timings are cached in ``cache`` (a JSON file;
    ``"default"``: ``$GKPD_CACHE_DIR`` or ``~/.cache/gkpd/latency.json``; ``None``: no file).

    ``max_seconds`` (``None``: no limit) bounds the timing: once it is spent, the layers not
    yet timed keep the error plan's configuration (on ``path="auto"``) and a further layout is
    not timed; the plan's ``options`` say how many layers were left (``latency_untimed``).
    On a busy machine timing can take minutes, and a job with a deadline needs the bound.
    """

    batch: int | None = None
    slack: float = 0.1
    cache: str | Path | None = "default"
    channels_last: bool = False
    layout: str = "auto"
    max_seconds: float | None = None

    name = "latency"  # a class attribute: the plan's ``objective``

    def __post_init__(self) -> None:
        batch, slack = self.batch, self.slack
        if batch is not None and (
            isinstance(batch, bool) or not isinstance(batch, int) or batch < 1
        ):
            raise ValueError(f"latency_batch must be a positive int or None, got {batch!r}")
        if isinstance(slack, bool) or not isinstance(slack, numbers.Real) or not slack >= 0:
            raise ValueError(f"latency_slack must be a number >= 0, got {slack!r}")
        if not isinstance(self.channels_last, bool):
            raise ValueError(
                f"latency_channels_last must be True or False, got {self.channels_last!r}"
            )
        seconds = self.max_seconds
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(
                seconds, numbers.Real) or not seconds > 0):
            raise ValueError(f"max_seconds must be a number > 0 or None, got {seconds!r}")
        check_layout(self.layout, "latency layout", auto=True)
        if self.channels_last:
            if self.layout not in ("auto", "channels_last"):
                raise ValueError(f"channels_last=True contradicts layout={self.layout!r}")
            warnings.warn("LatencyObjective(channels_last=True) is deprecated: pass "
                          "layout='channels_last'", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "layout", "channels_last")
            object.__setattr__(self, "channels_last", False)  # one spelling, for equality

    def batch_for(self, example_input: Any) -> int:
        """The batch size timed: ``batch``, else the example input's."""
        return self.batch or ModelCall.of(example_input).batch

    def options(self, example_input: Any) -> dict[str, Any]:
        """What the plan's ``options`` record of this objective."""
        options = {"latency_batch": self.batch_for(example_input),
                   "latency_slack": self.slack, "latency_layout": self.layout}
        if self.max_seconds is not None:
            options["latency_max_seconds"] = self.max_seconds
        return options


def resolve_objective(objective: Any, legacy: dict[str, Any]) -> LatencyObjective | None:
    """``None`` for ``"error"``, a :class:`LatencyObjective` for one or for ``"latency"``
    (with the deprecated ``latency_*`` keywords of ``legacy``, which warn)."""
    unknown = sorted(set(legacy) - set(LEGACY_LATENCY_KEYWORDS))
    if unknown:
        raise TypeError(f"plan() got an unexpected keyword argument {unknown[0]!r}")
    if legacy:
        warnings.warn(
            f"gkpd.plan's {', '.join(sorted(legacy))} keyword(s) are deprecated: pass "
            "objective=gkpd.LatencyObjective(batch=..., slack=..., cache=..., "
            "layout=...)", DeprecationWarning, stacklevel=4,  # the caller of gkpd.plan
        )
    if isinstance(objective, LatencyObjective):
        if legacy:
            raise ValueError("give the latency settings in the LatencyObjective, not as "
                             f"{', '.join(sorted(legacy))}")
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "error":
        return None
    return LatencyObjective(**{LEGACY_LATENCY_KEYWORDS[k]: v for k, v in legacy.items()})


def fastest(objective: LatencyObjective, model, contexts, tables, full_tables, picks,
            example_input, fits):
    """Swap each pick for the fastest option within budget (see ``plan/latency_objective.py``),
    in each layout the objective allows, and keep the layout the model runs fastest in (see
    ``plan/layout_choice.py``); the picks then index the full candidate tables. Returns
    ``(tables, picks, timings, change in parameters, the plan options of the layout)``."""
    from gkpd.plan.latency_objective import LayerTimer, fastest_within_budget
    from gkpd.plan.layout_choice import (
        choose_layout,
        factored_if_faster,
        layouts_to_time,
        timed_models,
    )
    from gkpd.timing import LatencyCache, default_cache_path

    # picks index the Pareto tables; find the same configurations in the full tables
    full_picks = []
    for table, full, pick in zip(tables, full_tables, picks, strict=True):
        full_picks.append(None if pick is None else full.configs.index(table.configs[pick]))
    cache_path = objective.cache
    cache = LatencyCache(default_cache_path() if cache_path == "default" else cache_path)
    batch = objective.batch_for(example_input)
    deadline = None if objective.max_seconds is None else (
        time.monotonic() + objective.max_seconds)

    def stop() -> bool:
        return deadline is not None and time.monotonic() > deadline

    per_layout: dict[str, list] = {}
    untimed = 0
    for layout in layouts_to_time(objective.layout, contexts):
        if per_layout and stop():
            log.info("latency: max_seconds %g spent; layout %s not timed",
                     objective.max_seconds, layout)
            continue
        timer = LayerTimer(batch, cache, layout=layout)
        timings = fastest_within_budget(
            contexts, full_tables, full_picks, timer=timer, error_slack=objective.slack,
            fits=fits, stop=stop,
        )
        cache.save()
        log.info("latency (%s): %d configurations timed, %d from the cache (%d layer(s) timed "
                 "again: their cached dense time was off)", layout, timer.measured,
                 timer.cached, timer.stale)
        # picked layers without a timing (an embedding has one way to run) were cut off
        left = sum(t is None and p is not None and not isinstance(c.module, nn.Embedding)
                   for t, p, c in zip(timings, full_picks, contexts, strict=True))
        if left and per_layout:  # a layout timed in part is not compared with a whole one
            continue
        per_layout[layout] = factored_if_faster(model, example_input, batch, contexts,
                                                full_tables, timings, layout)
        untimed = left
        if left:
            log.info("latency: max_seconds %g spent; %d layer(s) not timed keep the error "
                     "plan's configuration", objective.max_seconds, left)
    choice = choose_layout(model, example_input, batch,
                           timed_models(model, contexts, full_tables, per_layout),
                           layouts_to_time("auto", contexts))
    timings = per_layout[choice.layout]
    warn_if_dense_speed(timings, batch)
    # an untimed layer (an embedding: one way to run) keeps its pick
    picks = [q if t is None else t.pick for t, q in zip(timings, full_picks, strict=True)]
    total_change = sum(
        int(full.params[p]) - int(full.params[q])
        for full, p, q in zip(full_tables, picks, full_picks, strict=True) if p is not None
    )
    options = choice.options()
    if objective.max_seconds is not None:
        options["latency_untimed"] = untimed
    return full_tables, picks, timings, total_change, options


def warn_if_dense_speed(timings: list, batch: int) -> None:
    """Say so when most timed layers run fastest as the dense op with the reconstructed
    weight: the plan then does the dense model's MACs at its speed (ResNet-32 at batch 1 on
    a 2-core CPU: every layer), and a larger batch may be where the factors pay."""
    timed = [t for t in timings if t is not None]
    dense = sum(t.path == WEIGHT_PATH for t in timed)
    if timed and 2 * dense > len(timed):
        log.warning(
            "latency: at batch %d the dense op with the reconstructed weight is the fastest "
            "path of %d of %d layers, so the plan runs at about the dense model's speed and "
            "MACs; if the model serves larger batches, time at one "
            "(LatencyObjective(batch=...), --latency-batch)", batch, dense, len(timed))


def describe_timing(entry: LayerPlan, timed, batch: int) -> None:
    entry.settings |= {
        "path": timed.path,
        "latency_batch": batch,
        "latency_ms": round(timed.seconds * 1e3, 4),
        "dense_latency_ms": round(timed.dense_seconds * 1e3, 4),
    }
