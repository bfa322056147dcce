"""``plan``: read a model and an example input, decide every layer, change nothing."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkpd.counting import module_macs, module_params
from gkpd.plan.budget import STRATEGIES, achieved, check_tolerance
from gkpd.plan.schema import CompressionPlan, LayerPlan
from gkpd.plan.select import Pattern, as_pattern_list, select_layers

log = logging.getLogger(__name__)

_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear)
OBJECTIVES = ("error", "latency")


@dataclass
class _Call:
    module: nn.Module
    input_shape: tuple[int, ...]
    calls: int = 1


def trace_layers(model: nn.Module, example_input: Any) -> dict[str, _Call]:
    """Conv/linear layers in the order the forward pass calls them, with their input shape."""
    seen: dict[str, _Call] = {}
    handles = []

    def hook_for(name: str):
        def hook(module, args, _output):
            if name in seen:
                seen[name].calls += 1
            elif args and isinstance(args[0], torch.Tensor):
                seen[name] = _Call(module, tuple(args[0].shape))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, _LAYER_TYPES):
            handles.append(module.register_forward_hook(hook_for(name)))
    modes = {m: m.training for m in model.modules()}
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as error:
        raise ValueError(
            f"the model failed on example_input (shapes "
            f"{[tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]}): {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return seen


def dense_entry(name: str, call: _Call, **fields: Any) -> LayerPlan:
    """The plan entry of a layer left as it is: its dense size and MACs per sample."""
    module, per_sample = call.module, _per_sample(call.input_shape)
    dense_macs = module_macs(module, per_sample) * call.calls
    params = module_params(module)
    return LayerPlan(
        name=name, module_type=type(module).__name__, weight_shape=tuple(module.weight.shape),
        input_shape=per_sample, dense_params=params, dense_macs=dense_macs, params=params,
        macs=dense_macs, **fields,
    )


def _pattern_names(patterns, argument: str) -> list[str]:
    return [p.__name__ if isinstance(p, type) else p for p in as_pattern_list(patterns, argument)]


def _per_sample(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *shape[1:]) if len(shape) > 1 else shape


def plan(
    model: nn.Module,
    example_input: Any,
    *,
    ratio: float = 5.0,
    method: str = "gkpd",
    strategy: str = "uniform",
    include: Pattern | Iterable[Pattern] | None = None,
    exclude: Pattern | Iterable[Pattern] | None = None,
    overrides: Mapping[str, Any] | None = None,
    min_params: int = 1024,
    allow_more_macs: bool = False,
    min_layer_ratio: float | None = None,
    tolerance: float = 0.03,
    exhaustive: bool = False,
    objective: str = "error",
    latency_batch: int | None = None,
    latency_slack: float = 0.1,
    latency_cache: str | Path | None = "default",
    latency_channels_last: bool = False,
) -> CompressionPlan:
    """Choose, for every conv/linear layer ``model`` calls on ``example_input``, whether and how
    to compress it so the whole model shrinks ``ratio``-fold (every parameter counted).

    ``strategy``: ``"uniform"`` (every compressed layer at the same ratio, the paper's
    setting) or ``"global"`` (minimize the summed squared relative error). ``include`` /
    ``exclude``: module types, names or ``"re:"`` regexes; ``overrides``: per layer name,
    ``"skip"`` or a dict of settings the method fixes for that layer (gkpd: ``a_shape``
    and optionally ``rank``; svd, cp, tensor_train, tensor_ring: ``rank``; tucker:
    ``ranks``). Unless
    ``allow_more_macs``, no configuration costs more MACs than its dense layer. Layers are
    offered ranks down to a layer ratio of ``min_layer_ratio`` (default: ``ratio/1.5`` for
    uniform, ``ratio/4`` for global; at least 1). Layers with the same shape, settings and
    input size share the search of the first of them (only the factor shapes on its Pareto
    front are tried again) unless ``exhaustive``. Pure: the model is not changed.

    ``objective="latency"`` (GKPD only) then times, on this machine at batch
    ``latency_batch`` (default: the example input's), every configuration of each layer
    whose error is within ``1 + latency_slack`` times the chosen one's and that keeps the
    model within budget, in both stage orders, on the channel paths its factor shapes allow
    and on the reconstructed-weight path, and keeps the fastest. ``latency_channels_last``
    times on channels_last inputs: for models run in that memory format
    (``model.to(memory_format=torch.channels_last)``), where grouped convolutions are much
    faster on CPU. Timings are cached in ``latency_cache`` (a JSON file; ``"default"``:
    ``$GKPD_CACHE_DIR`` or ``~/.cache/gkpd/latency.json``; ``None``: no file).
    """
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 1:
        raise ValueError(f"ratio must be a number > 1, got {ratio!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if not isinstance(min_params, int) or min_params < 0:
        raise ValueError(f"min_params must be an int >= 0, got {min_params!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "latency":
        if method != "gkpd":
            raise ValueError(
                f"objective='latency' is supported for method 'gkpd' only, got method={method!r}"
            )
        if latency_batch is not None and (
            isinstance(latency_batch, bool) or not isinstance(latency_batch, int)
            or latency_batch < 1
        ):
            raise ValueError(f"latency_batch must be a positive int or None, got {latency_batch!r}")
        if isinstance(latency_slack, bool) or not isinstance(latency_slack, numbers.Real) or not (
            latency_slack >= 0
        ):
            raise ValueError(f"latency_slack must be a number >= 0, got {latency_slack!r}")
        if not isinstance(latency_channels_last, bool):
            raise ValueError(
                f"latency_channels_last must be True or False, got {latency_channels_last!r}"
            )
    from gkpd.methods import LayerContext, get_method  # methods build on the plan schema

    compressor = get_method(method)
    if hasattr(compressor, "plan_model"):  # whole-model methods (prune) plan on their own
        return compressor.plan_model(
            model, example_input, ratio=ratio, strategy=strategy, include=include,
            exclude=exclude, overrides=overrides, min_params=min_params, tolerance=tolerance,
        )
    if min_layer_ratio is None:
        min_layer_ratio = max(1.0, ratio / (1.5 if strategy == "uniform" else 4.0))
    if not min_layer_ratio >= 1:
        raise ValueError(f"min_layer_ratio must be >= 1, got {min_layer_ratio!r}")

    calls = trace_layers(model, example_input)
    if not calls:
        raise ValueError("the model calls no conv or linear layer on example_input")
    first_conv = next(
        (n for n, c in calls.items() if isinstance(c.module, nn.modules.conv._ConvNd)), None
    )
    selection = select_layers(
        {n: c.module for n, c in calls.items()}, include=include, exclude=exclude,
        overrides=overrides, first_layer=first_conv, min_params=min_params,
    )

    entries: dict[str, LayerPlan] = {}
    shared_families: dict[tuple, frozenset] = {}
    contexts, tables, full_tables = [], [], []
    for name, call in calls.items():
        module = call.module
        entry = dense_entry(name, call)
        per_sample, dense_macs = entry.input_shape, entry.dense_macs
        entries[name] = entry
        reason = selection.reasons[name] or compressor.supports(module)
        if reason:
            entry.reason = reason
            continue
        # Layers of one shape, settings and input size (ResNet-50 repeats each up to six
        # times) share the search: the first one searches every family, the others only
        # the families on its Pareto front.
        shape_key = (repr(module), per_sample)
        override = selection.overrides.get(name, {})
        ctx = LayerContext(
            name=name, module=module, input_shape=per_sample, dense_params=entry.dense_params,
            dense_macs=dense_macs // call.calls,
            max_macs=None if allow_more_macs else dense_macs // call.calls,
            min_ratio=min_layer_ratio, override=override,
            families=(
                None if exhaustive or override or objective == "latency"
                else shared_families.get(shape_key)
            ),
        )
        full_table = compressor.candidates(ctx)
        table = full_table.pareto()
        family = getattr(compressor, "family", None)
        if family is not None and not override and shape_key not in shared_families:
            shared_families[shape_key] = frozenset(family(c) for c in table.configs)
        if not len(table):
            entry.reason = (
                "no configuration both smaller than "
                f"1/{min_layer_ratio:g} of the layer and within its dense MACs"
            )
            continue
        contexts.append(ctx)
        tables.append(table)
        if objective == "latency":
            full_tables.append(full_table)

    dense_total = module_params(model)
    dense_layers = [ctx.dense_params for ctx in contexts]
    fixed = dense_total - sum(dense_layers)
    if not tables:
        raise ValueError(
            "no layer can be compressed: "
            + "; ".join(f"{e.name}: {e.reason}" for e in entries.values())
        )
    picks = STRATEGIES[strategy](tables, dense_layers, fixed, ratio, dense_total, tolerance)
    total = achieved(picks, tables, dense_layers, fixed)
    check_tolerance(total, dense_total, ratio, tolerance)
    timings: list = [None] * len(picks)
    if objective == "latency":
        start = total

        def fits(extra: int) -> bool:
            return _within(start + extra, dense_total, ratio, tolerance)

        tables, picks, timings, change = _fastest(
            contexts, tables, full_tables, picks, example_input, latency_batch, latency_slack,
            latency_cache, latency_channels_last, fits,
        )
        total += change

    for ctx, table, pick, timed in zip(contexts, tables, picks, timings, strict=True):
        entry = entries[ctx.name]
        if pick is None:
            entry.reason = "kept dense by the global allocation"
            continue
        compressor.describe(ctx, table.configs[pick], entry)
        entry.method = compressor.name
        entry.params = int(table.params[pick])
        entry.macs = int(table.macs[pick]) * calls[ctx.name].calls
        if timed is not None:
            _describe_timing(entry, timed, latency_batch or _batch_of(example_input))
            # the timed path may run the other stage order than the one the MACs were for
            layer = compressor.build(ctx.module, entry, decompose=False)
            entry.macs = layer.macs((1, *ctx.input_shape[1:])) * calls[ctx.name].calls
        entry.relative_error = compressor.exact_error(ctx.module, entry)
        entry.reason = "compressed"

    layers = list(entries.values())
    result = CompressionPlan(
        model_type=type(model).__name__, method=compressor.name, target_ratio=float(ratio),
        strategy=strategy, objective=objective, dense_params=dense_total, params=total,
        dense_macs=sum(e.dense_macs for e in layers), macs=sum(e.macs for e in layers),
        layers=layers,
        options={
            "min_params": min_params, "allow_more_macs": allow_more_macs,
            "min_layer_ratio": min_layer_ratio, "tolerance": tolerance,
            "exhaustive": exhaustive,
            **({"latency_batch": latency_batch or _batch_of(example_input),
                "latency_slack": latency_slack, "latency_channels_last": latency_channels_last}
               if objective == "latency" else {}),
            "include": _pattern_names(include, "include"),
            "exclude": _pattern_names(exclude, "exclude"),
        },
    )
    log.info("plan: %d of %d layers compressed, ratio %.2f", len(result.compressed_layers),
             len(layers), result.achieved_ratio)
    return result


# ----------------------------------------------------------------------------- latency


def _batch_of(example_input: Any) -> int:
    first = example_input[0] if isinstance(example_input, tuple) else example_input
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 1 else 1


def _within(total: int, dense_total: int, ratio: float, tolerance: float) -> bool:
    return math.isclose(dense_total / total, ratio, rel_tol=tolerance)


def _fastest(contexts, tables, full_tables, picks, example_input, batch, slack, cache_path,
             channels_last, fits):
    """Swap each pick for the fastest option within budget (see ``plan/latency.py``); the
    picks then index the full candidate tables."""
    from gkpd.plan.latency_objective import LayerTimer, fastest_within_budget
    from gkpd.timing import LatencyCache, default_cache_path

    # picks index the Pareto tables; find the same configurations in the full tables
    full_picks = []
    for table, full, pick in zip(tables, full_tables, picks, strict=True):
        full_picks.append(None if pick is None else full.configs.index(table.configs[pick]))
    cache = LatencyCache(default_cache_path() if cache_path == "default" else cache_path)
    timer = LayerTimer(batch or _batch_of(example_input), cache, channels_last=channels_last)
    timings = fastest_within_budget(
        contexts, full_tables, full_picks, timer=timer, error_slack=slack, fits=fits
    )
    cache.save()
    picks = [None if t is None else t.pick for t in timings]
    total_change = sum(
        int(full.params[p]) - int(full.params[q])
        for full, p, q in zip(full_tables, picks, full_picks, strict=True) if p is not None
    )
    log.info("latency: %d configurations timed, %d from the cache (%d layer(s) timed again: "
             "their cached dense time was off)", timer.measured, timer.cached, timer.stale)
    return full_tables, picks, timings, total_change


def _describe_timing(entry: LayerPlan, timed, batch: int) -> None:
    entry.order = timed.order
    entry.settings = {
        "latency_batch": batch,
        "latency_ms": round(timed.seconds * 1e3, 4),
        "dense_latency_ms": round(timed.dense_seconds * 1e3, 4),
    }
