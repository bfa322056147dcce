"""Alias module: the latency objective is :mod:`gkpd.plan.latency_objective` and the timing
it runs on :mod:`gkpd.timing`; these names are re-exported for code that imports them from
here (scripts/main_job.py imports ``cpu_model``)."""

from gkpd.plan.latency_objective import LayerTimer, Option, Timed, fastest_within_budget
from gkpd.timing import (
    CACHE_ENV,
    LatencyCache,
    cpu_model,
    default_cache_path,
    environment_key,
    time_interleaved,
)

__all__ = [
    "CACHE_ENV",
    "LatencyCache",
    "LayerTimer",
    "Option",
    "Timed",
    "cpu_model",
    "default_cache_path",
    "environment_key",
    "fastest_within_budget",
    "time_interleaved",
]
