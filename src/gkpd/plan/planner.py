"""``plan``: read a model and an example input, decide every layer, change nothing.

The steps: resolve the options (:func:`gkpd.plan.request.resolve`), trace the layers
(:func:`gkpd.plan.trace.trace`), collect each layer's candidates (:func:`_collect`),
allocate the budget (:func:`_allocate`, then the latency objective's :func:`fastest`), and
describe the picks in the plan (:func:`_describe`, :func:`_assemble`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from gkpd.calibration import Calibration, collect_covariances
from gkpd.counting import counts_itself, module_params
from gkpd.layers.attention import with_unpacked_layers
from gkpd.methods import (
    LayerContext,
    LayerMethod,
    ModelMethod,
    data_aware_methods,
    get_method,
    layer_methods,
)
from gkpd.plan import coverage
from gkpd.plan.budget import (
    STRATEGIES,
    RatioMissed,
    UnreachableRatio,
    achieved,
    check_tolerance,
)
from gkpd.plan.candidates import Candidates
from gkpd.plan.layout_choice import check_runs_in, choose_plan_layout, layouts_to_time
from gkpd.plan.objective import (
    OBJECTIVES,
    LatencyObjective,
    describe_timing,
    fastest,
)
from gkpd.plan.request import Request, checked_max_error, resolve, with_min_layer_ratio
from gkpd.plan.schema import CompressionPlan, LayerPlan
from gkpd.plan.select import (
    SKIP,
    Pattern,
    own_forward_reason,
    select_layers,
    tied_layers,
    tied_reason,
)
from gkpd.plan.trace import LayerCall, Trace, dense_entry, pattern_names, trace, trace_layers
from gkpd.whiten import has_input_vectors

log = logging.getLogger(__name__)

__all__ = ["OBJECTIVES", "LatencyObjective", "dense_entry", "plan", "trace_layers"]


@dataclass
class _Search:
    """Per layer: its plan entry; for the layers with candidates, their context, Pareto
    table and (for the latency objective) full table, in call order."""

    entries: dict[str, LayerPlan] = field(default_factory=dict)
    contexts: list[LayerContext] = field(default_factory=list)
    tables: list[Candidates] = field(default_factory=list)
    full_tables: list[Candidates] = field(default_factory=list)
    timings: list = field(default_factory=list)  # per table, the latency objective's timing
    layout_options: dict = field(default_factory=dict)  # the latency objective's layout


def plan(
    model: nn.Module,
    example_input: Any,
    *,
    ratio: float = 5.0,
    method: str = "gkpd",
    strategy: str | None = None,
    include: Pattern | Iterable[Pattern] | None = None,
    exclude: Pattern | Iterable[Pattern] | None = None,
    overrides: Mapping[str, Any] | None = None,
    min_params: int = 1024,
    allow_more_macs: bool = False,
    min_layer_ratio: float | None = None,
    tolerance: float = 0.03,
    exhaustive: bool = False,
    objective: str | LatencyObjective = "error",
    calibration: Any = None,
    max_layer_error: float | None = None,
    layout: str = "auto",
    **deprecated: Any,
) -> CompressionPlan:
    """Choose, for every conv/linear layer ``model`` calls on ``example_input``, whether and how
    to compress it so the whole model shrinks ``ratio``-fold (every parameter counted).
    ``example_input``: a tensor (``model(x)``), a tuple of positional inputs (``model(*x)``)
    or a dict of keyword inputs (``model(**x)``), see :class:`gkpd.inputs.ModelCall`.

    ``strategy``: ``"uniform"`` (every compressed layer at the same ratio, the paper's
    setting), ``"near_uniform"`` (the largest uniform plan within the budget, the rest of
    the budget spent where the error falls most per parameter) or ``"global"`` (minimize the
    summed squared relative error; a layer may stay dense); by default uniform, near_uniform
    where the uniform rank steps miss the ratio, and global where that misses it too (logged
    at INFO; the plan's ``strategy`` says which and ``options["uniform_error"]`` why).
    ``include`` / ``exclude``: layer types, names of layers or of modules holding them, or
    ``"re:"`` regexes; ``overrides``: per layer name, ``"skip"`` or a dict of settings the
    method fixes for that layer (gkpd: ``a_shape`` and optionally ``rank``; svd, cp,
    tensor_train, tensor_ring: ``rank``; tucker: ``ranks``). Unless
    ``allow_more_macs``, no configuration costs more MACs than its dense layer. Layers are
    offered ranks down to a layer ratio of ``min_layer_ratio`` (default: ``ratio/1.5`` for
    uniform and near_uniform, ``ratio/4`` for global; at least 1). Layers with the same
    shape, settings and input size share the search of the first of them (only the factor
    shapes on its Pareto front are tried again) unless ``exhaustive``. Pure: the model is
    not changed.

    Each ``nn.MultiheadAttention`` is planned as its four projections (``q_proj``, ``k_proj``,
    ``v_proj``, ``out_proj``: :class:`gkpd.layers.attention.UnpackedMultiheadAttention`,
    which ``apply_`` puts in its place); the MACs of the attention products are counted
    (``attention_macs``). Each ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` is planned as its
    gate layers per layer and direction (``l0.ih``, called once on the whole sequence,
    ``l0.hh``, called at every step: :mod:`gkpd.layers.recurrent`), each ``nn.LSTMCell``,
    ``nn.GRUCell`` and ``nn.RNNCell`` as its ``ih`` and ``hh`` (every call counted:
    :mod:`gkpd.layers.recurrent_cells`). ``notes`` name the
    parameters outside every planned layer and the compressed layers that keep little of
    their weight (also logged as a warning).

    ``max_layer_error`` (layer methods): no layer is offered a configuration whose relative
    error reaches it, so a layer that would keep too little of its weight (say 0.95) stays
    dense and the other layers take the budget.

    ``objective``: ``"error"``, or a :class:`LatencyObjective` (GKPD only) to keep, per
    layer, the fastest configuration within an error slack, timed on this machine.
    ``objective="latency"`` is ``LatencyObjective()``; the keywords ``latency_batch``,
    ``latency_slack``, ``latency_cache`` and ``latency_channels_last`` set its fields
    (deprecated: pass the object).

    ``layout``: the memory layout the compressed model runs in (:func:`gkpd.apply_` makes it
    convert its inputs; callers pass and get NCHW tensors as before): ``"auto"`` times the
    compressed model in NCHW and in channels_last where some planned layer has a 4-d or 5-d
    input, at the example input's batch, and keeps the faster (``options["layout"]``, with
    the milliseconds per call beside the dense model's in ``options["model_latency"]``; a
    latency plan times its layers in each layout first); or one of
    :data:`gkpd.layout.LAYOUTS`, untimed. Layer methods only: ``prune`` keeps the caller's.

    ``calibration`` (methods ``gkpd`` and ``svd``): a :class:`gkpd.Calibration`, or inputs
    for one (a batched tensor or a DataLoader). Each layer's factors then minimise its output
    error on those inputs (GKPD's whitened by the Kronecker-factored covariance of its input
    patches, SVD's by the whole covariance) and, with
    ``Calibration(select=True)``, factor shapes, ranks and the global allocation are ranked
    by that output error. The plan records the settings; ``apply_`` needs the data
    again (``compress`` passes it on).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    request = resolve(
        ratio=ratio, method=method, strategy=strategy, include=include, exclude=exclude,
        overrides=overrides, min_params=min_params, allow_more_macs=allow_more_macs,
        min_layer_ratio=min_layer_ratio, tolerance=tolerance, exhaustive=exhaustive,
        objective=objective, deprecated=deprecated, layout=layout,
    )
    calibration = Calibration.of(calibration)
    if calibration is not None and method not in data_aware_methods():
        raise ValueError(f"calibration is used by methods {', '.join(data_aware_methods())} "
                         f"only, got method={method!r}")
    request = replace(request, calibration=calibration,
                      max_layer_error=checked_max_error(max_layer_error))
    compressor = get_method(method)
    if isinstance(compressor, ModelMethod):  # whole-model methods (prune) plan on their own
        for name, value, default in (("max_layer_error", max_layer_error, None),
                                     ("layout", layout, "auto")):
            if value != default:
                raise ValueError(f"{name} is for layer methods; method {method!r} plans the "
                                 "whole model")
        return compressor.plan_model(
            model, example_input, ratio=ratio, strategy=request.strategy, include=include,
            exclude=exclude, overrides=overrides, min_params=min_params, tolerance=tolerance,
        )
    if not isinstance(compressor, LayerMethod):
        raise TypeError(f"method {method!r} is neither a LayerMethod nor a ModelMethod")

    unpacked = with_unpacked_layers(model)  # a copy with attention/recurrent layers as linears
    traced = trace(unpacked, example_input)
    if not traced.layers:
        raise ValueError("the model calls no conv, linear or embedding layer on example_input")
    result = _plan_with_fallback(compressor, unpacked, traced, request, example_input)
    if request.objective is None:
        _set_layout(result, model, unpacked, example_input, request.layout, traced)
    return result


def _set_layout(result: CompressionPlan, model: nn.Module, unpacked: nn.Module,
                example_input: Any, layout: str, traced: Trace) -> None:
    """Record the layout of an error plan: ``layout`` (channels_last once the model is seen
    to run in it), or for ``"auto"`` the faster one where there is a choice
    (:func:`gkpd.plan.layout_choice.choose_plan_layout`)."""
    if layout != "auto":
        if layout != "contiguous":
            check_runs_in(model, example_input, layout)
        result.options["layout"] = layout
        return
    layouts = layouts_to_time("auto", [traced.layers[e.name] for e in result.compressed_layers])
    if len(layouts) > 1:
        result.options.update(choose_plan_layout(model, unpacked, result, example_input,
                                                 layouts).options())


def _plan_with_fallback(compressor: LayerMethod, model: nn.Module, traced: Trace,
                        request: Request, example_input: Any) -> CompressionPlan:
    """:func:`_plan_layers` with the request's strategy or, where none was asked for and
    uniform misses the ratio, the fallback strategies."""
    searches: dict[float, _Search] = {}  # a strategy that misses leaves its search as it was
    try:
        return _plan_layers(compressor, model, traced, request, example_input, searches)
    except RatioMissed as error:
        if not request.fall_back:
            raise
        uniform_error = error
    # Uniform rank steps can be too coarse (GKPD at 9.93x, svd and tensor_ring at 5x on
    # ResNet-32): near_uniform tops the largest uniform plan within the budget up; global,
    # with finer steps still, is the last resort.
    for strategy in ("near_uniform", "global"):
        log.info("strategy 'uniform': %s; planning with strategy '%s'", uniform_error, strategy)
        try:
            result = _plan_layers(compressor, model, traced, replace(request, strategy=strategy),
                                  example_input, searches)
        except RatioMissed as error:
            missed = error
            continue
        result.options["uniform_error"] = str(uniform_error)
        return result
    raise missed


def _plan_layers(compressor: LayerMethod, model: nn.Module, traced: Trace, request: Request,
                 example_input: Any, searches: dict[float, _Search]) -> CompressionPlan:
    """The plan of a layer method with the request's strategy: collect, allocate, describe,
    assemble. The candidates depend on the strategy only through its ``min_layer_ratio``:
    ``searches`` keeps them by it, so that a fallback strategy with the same one (uniform,
    then near_uniform) does not search again."""
    calls = traced.layers
    request = with_min_layer_ratio(request)
    search = searches.get(request.min_layer_ratio)
    if search is None:
        search = searches[request.min_layer_ratio] = _collect(compressor, calls, request, model)
    dense_total = module_params(model)
    holders = coverage.unplanned_parameters(model, calls, layer_methods())
    try:
        picks, total, search = _allocate(search, request, dense_total, example_input, model)
    except UnreachableRatio as error:
        if error.best is None:
            raise
        # the same class: a RatioMissed stays one, so that plan() can fall back to 'global'
        raise type(error)(coverage.unreachable_message(
            error.finding, error.best, search.entries, {n: c.module for n, c in calls.items()},
            holders, dense_total, compressor.name, layer_methods(),
        ), best=error.best) from None
    _describe(compressor, search, picks, calls, request, example_input)
    return _assemble(model, compressor, search, request, dense_total, total, example_input,
                     traced.attention_macs, holders)


def _collect(compressor: LayerMethod, calls: dict[str, LayerCall], request: Request,
             model: nn.Module) -> _Search:
    """Every layer's plan entry (dense, with the reason when it stays so) and, for those the
    method can take, its candidates (ranked on the calibration data, when there is some)."""
    first_conv = next(
        (n for n, c in calls.items() if isinstance(c.module, nn.modules.conv._ConvNd)), None
    )
    selection = select_layers(
        {n: c.module for n, c in calls.items()}, include=request.include,
        exclude=request.exclude, overrides=request.overrides, first_layer=first_conv,
        min_params=request.min_params,
    )
    latency = request.objective is not None
    calibration = request.calibration
    tied = tied_layers(model)
    covariances = {} if calibration is None else collect_covariances(
        model,
        {n: c.module for n, c in calls.items()
         if not selection.reasons[n] and not compressor.supports(c.module)
         and not tied_reason(n, tied) and not own_forward_reason(c.module)
         and has_input_vectors(c.module)},
        calibration,
    )
    search = _Search()
    shared_families: dict[tuple, frozenset] = {}
    for name, call in calls.items():
        module = call.module
        entry = dense_entry(name, call)
        per_sample, per_call = entry.input_shape, call.first_call_macs()
        search.entries[name] = entry
        reason = selection.reasons[name] or compressor.supports(module)
        kept = None if reason else tied_reason(name, tied) or own_forward_reason(module)
        if kept:  # stays dense whatever the overrides say: replacing it would be wrong
            if any(k != SKIP for k in selection.overrides.get(name, {})):
                raise ValueError(f"overrides[{name!r}] compresses layer {name!r}, but {kept}")
            reason = kept
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
            dense_macs=per_call, max_macs=None if request.allow_more_macs else per_call,
            min_ratio=request.min_layer_ratio, override=override,
            families=(
                None if request.exhaustive or override or latency
                else shared_families.get(shape_key)
            ),
            **(
                # an embedding has none: its inputs are token ids
                {"input_covariance": covariances.get(name), "damping": calibration.damping,
                 "select_by_output": calibration.select}
                if calibration is not None else {}
            ),
        )
        full_table = compressor.candidates(ctx)
        if request.max_layer_error is not None:
            full_table = full_table.subset(full_table.error < request.max_layer_error)
        table = full_table.pareto()
        if not override and shape_key not in shared_families:
            families = frozenset(compressor.family(c) for c in table.configs)
            if None not in families:  # the method has families (LayerMethod.family)
                shared_families[shape_key] = families
        if not len(table):
            entry.reason = (
                "no configuration both smaller than "
                f"1/{request.min_layer_ratio:g} of the layer and within its dense MACs"
                + ("" if request.max_layer_error is None
                   else f" and below max_layer_error {request.max_layer_error:g}")
            )
            continue
        search.contexts.append(ctx)
        search.tables.append(table)
        if latency:
            search.full_tables.append(full_table)
    return search


def _allocate(search: _Search, request: Request, dense_total: int, example_input: Any,
              model: nn.Module):
    """The strategy's pick per layer (``None``: dense), then the latency objective's; returns
    ``(picks, total parameters, search)`` with ``search.tables`` the tables picks index."""
    dense_layers = [ctx.dense_params for ctx in search.contexts]
    fixed = dense_total - sum(dense_layers)
    if not search.tables:
        raise ValueError(
            "no layer can be compressed: "
            + "; ".join(f"{e.name}: {e.reason}" for e in search.entries.values())
        )
    ratio, tolerance = request.ratio, request.tolerance
    picks = STRATEGIES[request.strategy](
        search.tables, dense_layers, fixed, ratio, dense_total, tolerance
    )
    total = achieved(picks, search.tables, dense_layers, fixed)
    check_tolerance(total, dense_total, ratio, tolerance)
    search.timings = [None] * len(picks)
    if request.objective is not None:
        start = total

        def fits(extra: int) -> bool:
            return math.isclose(dense_total / (start + extra), ratio, rel_tol=tolerance)

        search.tables, picks, search.timings, change, search.layout_options = fastest(
            request.objective, model, search.contexts, search.tables, search.full_tables,
            picks, example_input, fits,
        )
        total += change
    return picks, total, search


def _describe(compressor: LayerMethod, search: _Search, picks, calls, request: Request,
              example_input: Any) -> None:
    """Write each pick into its layer's plan entry."""
    for ctx, table, pick, timed in zip(
        search.contexts, search.tables, picks, search.timings, strict=True
    ):
        entry = search.entries[ctx.name]
        if pick is None:
            entry.reason = "kept dense by the global allocation"
            continue
        entry.method = compressor.name  # a mixing method (auto) names its component
        compressor.describe(ctx, table.configs[pick], entry)
        entry.params = int(table.params[pick])
        call = calls[ctx.name]
        entry.macs = call.over_calls(int(table.macs[pick]))
        if timed is not None:
            describe_timing(entry, timed, request.objective.batch_for(example_input))
        # the timed path may run the other stage order than the one the MACs were for, and
        # auto may run another at each size: a layer that counts itself is counted exactly
        if timed is not None or not call.one_size:
            layer = compressor.build(ctx.module, entry, decompose=False)
            if counts_itself(layer):
                entry.macs = call.macs_of(layer)
        if table.is_exact(pick):  # the table's error is the built layer's: no second SVD
            entry.relative_error = float(table.error[pick])
        else:
            entry.relative_error = compressor.exact_error(
                ctx.module, entry,
                **({"input_covariance": ctx.input_covariance}
                   if request.calibration is not None else {}),
            )
        entry.reason = "compressed"


def _assemble(model: nn.Module, compressor: LayerMethod, search: _Search, request: Request,
              dense_total: int, total: int, example_input: Any, attention: int,
              holders: list[coverage.Holder]) -> CompressionPlan:
    """The plan: the entries, their totals, the options that made them and its notes."""
    layers = list(search.entries.values())
    objective = request.objective
    notes = coverage.holder_notes(holders, dense_total)
    weak = coverage.weak_layers(layers)
    if weak:
        notes.append(coverage.weak_note(weak))
        log.warning("plan: %s", notes[-1])
        for entry in weak:
            entry.reason = f"compressed; keeps little (relative error {entry.relative_error:.3f})"
    result = CompressionPlan(
        model_type=type(model).__name__, method=compressor.name,
        target_ratio=float(request.ratio), strategy=request.strategy,
        objective="error" if objective is None else objective.name, dense_params=dense_total,
        params=total, dense_macs=sum(e.dense_macs for e in layers) + attention,
        macs=sum(e.macs for e in layers) + attention, layers=layers, attention_macs=attention,
        notes=notes,
        options={
            "min_params": request.min_params, "allow_more_macs": request.allow_more_macs,
            "min_layer_ratio": request.min_layer_ratio, "tolerance": request.tolerance,
            "exhaustive": request.exhaustive,
            **({"max_layer_error": request.max_layer_error}
               if request.max_layer_error is not None else {}),
            **(objective.options(example_input) if objective is not None else {}),
            **search.layout_options,
            **({"calibration": request.calibration.settings()}
               if request.calibration is not None else {}),
            "include": pattern_names(request.include, "include"),
            "exclude": pattern_names(request.exclude, "exclude"),
        },
    )
    log.info("plan: %d of %d layers compressed, ratio %.2f", len(result.compressed_layers),
             len(layers), result.achieved_ratio)
    return result
