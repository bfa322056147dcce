"""Planning: candidate configurations per layer, budget allocation, ``CompressionPlan``.

The modules below :mod:`gkpd.plan.planner` (``schema``, ``candidates``, ``budget``,
``select``, ``trace``, ``objective``) are what the compression methods build on; the planner
builds on the methods. So that importing one of those modules (as every method does) does not
import the planner, and with it the methods, ``plan`` is imported from the planner on first
use (the dependency stays one-way: planner -> methods -> plan's building blocks).
"""

from typing import Any

from gkpd.plan.budget import RatioMissed, UnreachableRatio
from gkpd.plan.objective import LatencyObjective
from gkpd.plan.schema import PLAN_VERSION, CompressionPlan, LayerPlan
from gkpd.plan.trace import trace_layers

__all__ = ["PLAN_VERSION", "CompressionPlan", "LatencyObjective", "LayerPlan",
           "RatioMissed", "UnreachableRatio", "plan", "trace_layers"]


def __getattr__(name: str) -> Any:
    if name == "plan":
        from gkpd.plan.planner import plan

        return plan
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
