"""The memory layout a plan runs in: per model, the layout in which the compressed model runs
fastest end to end — for a latency plan with every layer on its fastest path for that layout,
for an error plan with every layer on ``path="auto"``.

Per model rather than per layer: a change of layout between layers is a copy of the
activations, and on CPU the factored layers' grouped and depthwise convolutions are fast in
channels_last, the dense ones in either. The whole models are timed (the compressed one per
layout, the dense one in every layout, round by round as the layers are) because what the
layers' own timings leave out — the input's conversion, BatchNorm, pooling, additions — runs
in the chosen layout too. The dense model's best time is what the plan's speed-up is against.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gkpd.inputs import ModelCall, eval_mode
from gkpd.layers.attention import unfuse
from gkpd.layers.base import WEIGHT_PATH
from gkpd.layout import LAYOUTS, run_in_layout
from gkpd.methods import replace_layers
from gkpd.plan.latency_objective import Option, Timed, runnable
from gkpd.timing import time_interleaved

log = logging.getLogger(__name__)

__all__ = ["LayoutChoice", "check_runs_in", "choose_layout", "choose_plan_layout",
           "factored_if_faster", "layouts_to_time", "timed_models"]

_MIN_SECONDS = 0.3  # per model, spread over its rounds
_ERROR_PLAN_SECONDS = 0.1
_TIE = 0.05  # relative: a preferred layout no slower than this beside the fastest is kept


def layouts_to_time(requested: str, contexts: Sequence) -> tuple[str, ...]:
    """The layouts ``requested`` (``"auto"`` or one of ``LAYOUTS``) asks to time: for
    ``"auto"``, channels_last only where some layer has a 4-d or 5-d input."""
    if requested != "auto":
        return (requested,)
    if any(len(ctx.input_shape) in (4, 5) for ctx in contexts):
        return LAYOUTS
    return ("contiguous",)


@dataclass(frozen=True)
class LayoutChoice:
    """The layout a plan runs in, and the whole-model seconds per call that chose it."""

    layout: str
    batch: int
    seconds: Mapping[str, float]  # the compressed model, per layout timed
    dense_seconds: Mapping[str, float]  # the dense model, per layout

    def options(self) -> dict[str, Any]:
        """What the plan's ``options`` record: ``layout`` (what ``apply_`` runs the model in)
        and ``model_latency`` (milliseconds per call at ``batch``)."""
        ms = lambda seconds: {k: round(v * 1e3, 4) for k, v in seconds.items()}  # noqa: E731
        return {"layout": self.layout, "model_latency": {
            "batch": self.batch, "ms": ms(self.seconds), "dense_ms": ms(self.dense_seconds)}}


def timed_models(model: nn.Module, contexts: Sequence, tables: Sequence,
                 per_layout: Mapping[str, Sequence[Timed | None]]) -> dict[str, nn.Module]:
    """Per layout of ``per_layout``, a copy of ``model`` with each layer of ``contexts`` on
    its timed option (``Timed.pick`` indexes ``tables``; fresh factors)."""
    models = {}
    for layout, timings in per_layout.items():
        compressed = copy.deepcopy(model)
        for ctx, table, timed in zip(contexts, tables, timings, strict=True):
            if timed is not None and timed.path != WEIGHT_PATH:  # the weight path: dense
                option = Option(table.configs[timed.pick], timed.path)
                compressed.set_submodule(ctx.name, runnable(ctx.module, option))
        models[layout] = compressed
    return models


def factored_if_faster(model: nn.Module, example_input: Any, batch: int, contexts: Sequence,
                       tables: Sequence, timings: Sequence[Timed | None], layout: str, *,
                       min_seconds: float = _MIN_SECONDS) -> list[Timed | None]:
    """``timings``, or the same with every layer on the weight path moved to its
    configuration's fastest factored path (the same parameters), whichever runs the whole
    model faster in ``layout``. A layer timed alone keeps its dense weight in the cache, which
    in the model it shares with every other layer's: ResNet-32 5x at batch 1 with all 30
    layers factored ran 1.05x the dense model where the per-layer picks (11 on the weight
    path, each faster alone) ran 1.03x (CPU, 2 threads, interleaved)."""
    factored = [t.factored if t is not None and t.factored is not None else t for t in timings]
    if factored == list(timings):
        return list(timings)
    models = timed_models(model, contexts, tables, {"per-layer": timings, "factored": factored})
    seconds = _time_models(example_input, batch, {(kind, layout): m for kind, m in models.items()},
                           min_seconds)
    if len(seconds) < 2:
        return list(timings)
    faster = seconds["factored", layout] < seconds["per-layer", layout]
    moved = sum(t is not None and t.factored is not None for t in timings)
    log.info("latency (%s): %d layer(s) on the weight path %s: the whole model ran %.3g ms "
             "with them factored, %.3g ms on the weight path", layout, moved,
             "run factored" if faster else "stay", seconds["factored", layout] * 1e3,
             seconds["per-layer", layout] * 1e3)
    return factored if faster else list(timings)


def choose_layout(model: nn.Module, example_input: Any, batch: int,
                  compressed: Mapping[str, nn.Module], dense_layouts: Sequence[str], *,
                  min_seconds: float = _MIN_SECONDS, prefer: str | None = None
                  ) -> LayoutChoice:
    """Time ``model`` (in eval mode, a copy per layout of ``dense_layouts``) and each
    ``compressed[layout]`` run in its layout, on ``example_input`` repeated to ``batch``
    samples and passed in NCHW as callers do; keep the fastest layout, or ``prefer`` where
    no other is faster by more than ``_TIE``. A layout the model's forward fails in (a
    ``.view`` of a channels_last activation, say) is left out, and said so at INFO."""
    models = {("dense", layout): copy.deepcopy(model) for layout in dense_layouts}
    models |= {("compressed", layout): candidate for layout, candidate in compressed.items()}
    seconds = _time_models(example_input, batch, models, min_seconds)
    timed = {layout: seconds[kind, layout] for kind, layout in seconds if kind == "compressed"}
    if not timed:
        raise ValueError(f"the model's forward fails in every layout it could run in "
                         f"({', '.join(compressed)}; see the log): give another layout")
    fastest = min(timed, key=timed.get)
    if prefer in timed and timed[prefer] <= timed[fastest] * (1 + _TIE):
        fastest = prefer
    choice = LayoutChoice(fastest, batch, timed, {
        layout: seconds[kind, layout] for kind, layout in seconds if kind == "dense"})
    log.info("layout: the plan runs in %s (ms per call at batch %d: %s; dense: %s)",
             choice.layout, batch, _ms(choice.seconds), _ms(choice.dense_seconds))
    return choice


def _time_models(example_input: Any, batch: int, models: Mapping[tuple[str, str], nn.Module],
                 min_seconds: float) -> dict[tuple[str, str], float]:
    """Seconds per call of each ``models[kind, layout]``, in eval mode and run in ``layout``,
    on ``example_input`` repeated to ``batch`` samples and passed in NCHW as callers do; the
    models whose forward fails are left out (:func:`_runnable`)."""
    x = _at_batch(example_input, batch)
    calls = {(kind, layout): functools.partial(x.run, run_in_layout(m.eval(), layout))
             for (kind, layout), m in models.items()}
    with _flush_denormals():  # fresh factors: their values must not set the speed
        return time_interleaved(_runnable(calls), min_seconds=min_seconds)


def _runnable(calls: dict) -> dict:
    """The calls that run: a model whose forward fails in a layout cannot run in it."""
    kept = {}
    with torch.no_grad():
        for (kind, layout), call in calls.items():
            try:
                call()
            except Exception as error:  # whatever the model's own code raises
                log.info("layout: the %s model fails in %s, which is left out: %s: %s", kind,
                         layout, type(error).__name__, error)
                continue
            kept[kind, layout] = call
    return kept


def check_runs_in(model: nn.Module, example_input: Any, layout: str) -> None:
    """Raise ``ValueError`` unless ``model`` runs on ``example_input`` in ``layout`` (a layout
    asked for by name: its forward may not, e.g. ``x.view(N, -1)`` of a channels_last
    activation)."""
    call = ModelCall.of(example_input)
    try:
        with eval_mode(model), torch.no_grad():
            call.run(run_in_layout(copy.deepcopy(model), layout))
    except Exception as error:  # whatever the model's own code raises
        raise ValueError(
            f"layout={layout!r}: the model fails on example_input in that layout "
            f"({type(error).__name__}: {error}); use layout='auto', which leaves out the "
            "layouts a model cannot run in, or 'contiguous'"
        ) from error


def choose_plan_layout(model: nn.Module, unpacked: nn.Module, plan: Any, example_input: Any,
                       layouts: Sequence[str]) -> LayoutChoice:
    """:func:`choose_layout` for an error plan of ``model`` (``unpacked``: the planner's copy
    of it, attention and recurrent layers unpacked): its compressed model (fresh factors,
    every layer on ``path="auto"``) in each of ``layouts``, at the example input's batch. A
    short timing (about 0.1 s a model): the layout is the one choice left to measure."""
    compressed = copy.deepcopy(unpacked)
    replace_layers(compressed, plan.compressed_layers, decompose=False)
    compressed = unfuse(compressed)
    models = {layout: copy.deepcopy(compressed) if i else compressed
              for i, layout in enumerate(layouts)}
    # The example's batch (often 1) need not be the one the model serves; where the layouts
    # tie there, channels_last, which was the faster at larger batches in every measurement
    # here (ResNet-32 5x at b64: 1.31x dense, NCHW 0.77-0.91x; ResNet-50 2x at b8: 514 ms
    # against 600 in NCHW, with 72.9 against 73.6 ms at b1).
    return choose_layout(model, example_input, ModelCall.of(example_input).batch, models,
                         layouts, min_seconds=_ERROR_PLAN_SECONDS, prefer="channels_last")


def _ms(seconds: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v * 1e3:.3g}" for k, v in seconds.items())


def _at_batch(example_input: Any, batch: int) -> ModelCall:
    """The call of ``example_input`` with each batched tensor (2 dims or more) made of
    ``batch`` copies of its first sample, in NCHW."""
    return ModelCall.of(example_input).map(
        lambda t: t if t.dim() < 2 else t[:1].expand(batch, *t.shape[1:]).contiguous()
    )


@contextmanager
def _flush_denormals():
    previous = torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        yield
    finally:
        if previous:
            torch.set_flush_denormal(False)
