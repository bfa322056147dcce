"""Planning: candidate configurations per layer, budget allocation, ``CompressionPlan``."""

from gkpd.plan.budget import UnreachableRatio
from gkpd.plan.planner import plan, trace_layers
from gkpd.plan.schema import PLAN_VERSION, CompressionPlan, LayerPlan

__all__ = ["PLAN_VERSION", "CompressionPlan", "LayerPlan", "UnreachableRatio", "plan",
           "trace_layers"]
