"""What every compression method provides to the planner and to ``apply_``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan


@dataclass(frozen=True)
class LayerContext:
    """A layer as the planner found it: the module, the input it was called with (batch
    included) and the limits within which a method offers configurations."""

    name: str
    module: nn.Module
    input_shape: tuple[int, ...]
    dense_params: int
    dense_macs: int
    max_macs: int | None
    min_ratio: float
    override: dict[str, Any] = field(default_factory=dict)
    # Families (for GKPD: A-factor shapes) that a layer of the same shape and input found
    # worth keeping; a method may restrict its search to them (None: search everything).
    families: frozenset | None = None
    # Data-aware GKPD: the second moment of the layer's input vectors on calibration data
    # (``gkpd.whiten``), the damping of its Kronecker factors, and whether candidates are
    # ranked by the output error on that data (else by the weight error).
    input_covariance: Any = None
    damping: float = 0.01
    select_by_output: bool = False

    @property
    def bias_params(self) -> int:
        bias = getattr(self.module, "bias", None)
        return 0 if bias is None else bias.numel()

    def max_params(self) -> int:
        """The most parameters a configuration may have and still be of interest."""
        return math.floor(self.dense_params / self.min_ratio)


class Method(Protocol):
    name: str

    def supports(self, module: nn.Module) -> str | None:
        """``None`` when ``module`` can be compressed, else the reason it cannot."""

    def candidates(self, ctx: LayerContext) -> Candidates:
        """Configurations of the layer within ``ctx``'s limits (the dense layer excluded)."""

    def family(self, config: Any) -> Any:
        """A hashable key grouping configurations that share their search (e.g. a split)."""

    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        """Write ``config`` into the plan ``entry`` (shapes, rank, order, settings)."""

    def exact_error(self, module: nn.Module, entry: LayerPlan) -> float:
        """Relative reconstruction error of ``entry``'s configuration on ``module``."""

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        """The replacement for ``module``; its weights decomposed from the dense ones, or
        freshly initialized (for loading saved weights) when ``decompose`` is false."""
