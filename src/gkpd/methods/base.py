"""The two kinds of compression method and what they exchange with the planner.

* :class:`LayerMethod` compresses one conv/linear layer at a time: the planner asks it for
  the configurations of each layer (:meth:`~LayerMethod.candidates`), shares a whole-model
  budget among them, writes the chosen one into the plan (:meth:`~LayerMethod.describe`) and
  ``apply_`` builds the replacement (:meth:`~LayerMethod.build`). gkpd, svd, tucker, cp,
  tensor_train and tensor_ring are layer methods.
* :class:`ModelMethod` plans and applies the whole model at once (``prune``: removing a
  channel changes the layers it couples).

The planner and ``apply_`` dispatch on which of the two a method is (``isinstance``). A new
method subclasses one of them and joins with :func:`gkpd.methods.register_method`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import CompressionPlan, LayerPlan


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


DEFAULT_FINETUNE_LR = 0.01


class _Named(ABC):
    """What both kinds of method have: a ``name`` (the plan's ``method``) and a check that
    its optional dependencies are installed."""

    name: ClassVar[str]

    # Whether the method plans with calibration data (``gkpd.plan(..., calibration=...)``):
    # for a layer method, ``ctx.input_covariance`` is then set, ``describe`` marks whitened
    # entries (``settings["init"] == "whitened"``), and ``exact_error`` and ``build`` take the
    # layer's ``input_covariance`` keyword.
    data_aware: ClassVar[bool] = False

    # The learning rate at which models compressed by the method fine-tune best with
    # distillation, as measured (benchmarks/RESULTS.md, accuracy campaign): `gkpd finetune`
    # takes the smallest of a plan's methods when --lr is not given.
    finetune_lr: ClassVar[float] = DEFAULT_FINETUNE_LR

    def check_available(self) -> None:
        """Raise ``ImportError`` (saying what to install) when the method cannot run here;
        called before any work. The default: always available."""
        return None


class LayerMethod(_Named):
    """A method that compresses conv/linear layers one at a time (see the module docstring).

    A configuration (an element of :attr:`Candidates.configs`) is whatever the method needs
    to describe one way of compressing a layer; it must compare equal to itself across
    calls (the latency objective finds picks again by equality).
    """

    @abstractmethod
    def supports(self, module: nn.Module) -> str | None:
        """``None`` when ``module`` can be compressed, else the reason it cannot."""

    @abstractmethod
    def candidates(self, ctx: LayerContext) -> Candidates:
        """Configurations of the layer within ``ctx``'s limits (the dense layer excluded);
        ``ctx.override`` holds the settings the user fixed for this layer."""

    def family(self, config: Any) -> Hashable | None:
        """A hashable key grouping configurations that share their search (for GKPD: the
        A-factor shape). Layers of the same shape and input then search only the families
        on the first one's Pareto front (``ctx.families``). ``None``, the default: the
        method has no families and every layer searches everything."""
        return None

    @abstractmethod
    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        """Write ``config`` into the plan ``entry`` (its settings), so that
        :meth:`exact_error` and :meth:`build` can work from the entry alone. ``entry.method``
        is this method's name; a method that mixes others (``auto``) sets it to the one that
        builds the layer."""

    @abstractmethod
    def exact_error(self, module: nn.Module, entry: LayerPlan) -> float:
        """Relative reconstruction error of ``entry``'s configuration on ``module``; the
        planner asks only for picks whose candidate error is not marked exact
        (:attr:`Candidates.exact`)."""

    @abstractmethod
    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        """The replacement for ``module``; its weights decomposed from the dense ones, or
        freshly initialized (for loading saved weights) when ``decompose`` is false."""


class ModelMethod(_Named):
    """A method that plans and applies the whole model at once (see the module docstring)."""

    @abstractmethod
    def plan_model(
        self, model: nn.Module, example_input: Any, *, ratio: float, strategy: str,
        include: Any, exclude: Any, overrides: Any, min_params: int, tolerance: float,
    ) -> CompressionPlan:
        """The plan for ``model`` (pure: ``model`` is not changed); the arguments are those
        of :func:`gkpd.plan`, already checked (``example_input`` in any form
        :class:`gkpd.inputs.ModelCall` reads)."""

    @abstractmethod
    def apply_model(
        self, model: nn.Module, plan: CompressionPlan, *, decompose: bool = True
    ) -> nn.Module:
        """Change ``model`` in place as ``plan`` says (``plan`` fits ``model``: checked);
        returns ``model``. Without ``decompose`` the weights are about to be overwritten by
        ``load_state_dict``."""

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        """Refuses: a whole-model method builds no single layer (a caller treating every
        method as a layer method learns what to call instead)."""
        raise TypeError(f"a {self.name!r} plan is applied to the whole model: use gkpd.apply_")


Method = LayerMethod | ModelMethod
