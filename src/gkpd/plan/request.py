"""The options of one ``plan`` call: checked, with their defaults filled in, as one
:class:`Request` that the planner's steps pass along."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from gkpd.calibration import Calibration
from gkpd.layout import check_layout
from gkpd.plan.budget import STRATEGIES
from gkpd.plan.objective import LatencyObjective, resolve_objective


@dataclass(frozen=True)
class Request:
    """The options of one ``plan`` call, checked and with their defaults filled in.

    An option group of its own (``objective``: a :class:`LatencyObjective` or ``None`` for
    the error objective) is resolved in :func:`resolve` into one field here; a data-aware
    group (a calibration set, say) belongs next to it, and reaches the methods through
    :class:`LayerContext`.
    """

    ratio: float
    strategy: str
    fall_back: bool  # no strategy asked for: "near_uniform" where "uniform" misses the ratio
    include: Any
    exclude: Any
    overrides: Mapping[str, Any] | None
    min_params: int
    allow_more_macs: bool
    min_layer_ratio: float | None
    tolerance: float
    exhaustive: bool
    objective: LatencyObjective | None
    calibration: Calibration | None = None
    max_layer_error: float | None = None
    layout: str = "auto"  # of an error plan; a latency plan's is its objective's


def resolve(*, ratio, method, strategy, include, exclude, overrides, min_params,
             allow_more_macs, min_layer_ratio, tolerance, exhaustive, objective,
             deprecated, layout="auto") -> Request:
    """Check the options and bundle them (the method-independent checks, in the order
    ``plan`` always made them)."""
    if (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio > 1
            or not math.isfinite(ratio)):
        raise ValueError(f"ratio must be a finite number > 1, got {ratio!r}")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(
            f"strategy must be one of {sorted(STRATEGIES)} or None, got {strategy!r}"
        )
    if not isinstance(min_params, int) or min_params < 0:
        raise ValueError(f"min_params must be an int >= 0, got {min_params!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}")
    if objective == "latency" or isinstance(objective, LatencyObjective):
        if method != "gkpd":
            raise ValueError(
                f"objective='latency' is supported for method 'gkpd' only, got method={method!r}"
            )
    check_layout(layout, auto=True)
    resolved = resolve_objective(objective, deprecated)
    if resolved is not None and layout != "auto":
        if resolved.layout not in ("auto", layout):
            raise ValueError(f"layout={layout!r} contradicts the objective's "
                             f"layout={resolved.layout!r}")
        resolved = replace(resolved, layout=layout)
    return Request(
        ratio=ratio, strategy=strategy or "uniform", fall_back=strategy is None,
        include=include, exclude=exclude, overrides=overrides,
        min_params=min_params, allow_more_macs=allow_more_macs,
        min_layer_ratio=min_layer_ratio, tolerance=tolerance, exhaustive=exhaustive,
        objective=resolved, layout="auto" if resolved is not None else layout,
    )


def checked_max_error(max_layer_error: Any) -> float | None:
    if max_layer_error is None:
        return None
    if (isinstance(max_layer_error, bool) or not isinstance(max_layer_error, numbers.Real)
            or not 0 < max_layer_error <= 1):
        raise ValueError(f"max_layer_error must be a number in (0, 1] or None, got "
                         f"{max_layer_error!r}")
    return float(max_layer_error)


def with_min_layer_ratio(request: Request) -> Request:
    """``request`` with the default ``min_layer_ratio`` of its strategy, checked (layer
    methods only: a whole-model method has no layer ratio)."""
    min_layer_ratio = request.min_layer_ratio
    if min_layer_ratio is None:
        min_layer_ratio = max(1.0, request.ratio / (4.0 if request.strategy == "global" else 1.5))
    if not min_layer_ratio >= 1:
        raise ValueError(f"min_layer_ratio must be >= 1, got {min_layer_ratio!r}")
    return replace(request, min_layer_ratio=min_layer_ratio)
