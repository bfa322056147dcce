"""``auto``: a per-layer mixed plan, each layer by the method that keeps most of it.

Every layer is offered the configurations of several layer methods at once (by default GKPD,
Tucker-2 and SVD; Tucker only where TensorLy is installed), and the planner's strategy chooses
among all of them by the same relative weight error, size and MAC limits as for one method.
The plan's ``method`` is ``"auto"``; each compressed layer's entry names the method that builds
it, so ``apply_``, ``save`` and ``load`` treat it as a layer of that method.

A configuration is ``(method name, that method's configuration)``. A per-layer override names
the method: ``{"method": "tucker", "ranks": [8, 8]}`` (the other keys are that method's).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan

log = logging.getLogger(__name__)


class Auto(LayerMethod):
    """Mixes ``components`` (layer methods, tried in this order) layer by layer."""

    name = "auto"

    def __init__(self, components: Sequence[LayerMethod]) -> None:
        if not components:
            raise ValueError("method 'auto' needs at least one component method")
        self._components = {method.name: method for method in components}
        self._available: list[LayerMethod] | None = None

    def check_available(self) -> None:
        """Find which components are installed here, once per plan (``get_method`` calls this
        before any work), and say at INFO which are left out. ``auto`` itself is always
        available: GKPD needs nothing optional."""
        found = []
        for method in self._components.values():
            try:
                method.check_available()
            except ImportError as error:
                log.info("method 'auto' plans without %r: %s", method.name, error)
                continue
            found.append(method)
        self._available = found

    def available(self) -> list[LayerMethod]:
        """The components whose optional dependencies are installed here."""
        if self._available is None:
            self.check_available()
        return self._available

    def component(self, name: str) -> LayerMethod:
        if name not in self._components:
            raise ValueError(
                f"method 'auto' mixes {', '.join(self._components)}; got method {name!r}"
            )
        return self._components[name]

    def supports(self, module: nn.Module) -> str | None:
        reasons = []
        for method in self.available():
            reason = method.supports(module)
            if reason is None:
                return None
            reasons.append(f"{method.name}: {reason}")
        return "; ".join(reasons) or "no component method is installed"

    def candidates(self, ctx: LayerContext) -> Candidates:
        override = {k: v for k, v in ctx.override.items() if k != "skip"}
        if override and "method" not in override:
            raise ValueError(
                f"overrides[{ctx.name!r}] for method 'auto' must name the method that compresses "
                f"the layer, e.g. {{'method': 'gkpd', **{override!r}}}"
            )
        methods = self.available()
        if override:
            chosen = self.component(override.pop("method"))
            if chosen not in methods:
                chosen.check_available()  # says what to install
            methods = [chosen]
        parts = []
        for method in methods:
            if method.supports(ctx.module) is not None:
                continue
            sub = replace(ctx, override=override, families=self._families_of(ctx, method.name))
            if sub.families is not None and not sub.families:
                continue  # none of this method's configurations was on the shared front
            table = method.candidates(sub)
            table.configs = [(method.name, config) for config in table.configs]
            parts.append(table)
        return Candidates.concatenate(parts)

    @staticmethod
    def _families_of(ctx: LayerContext, name: str) -> frozenset | None:
        if ctx.families is None:
            return None
        mine = frozenset(family for method, family in ctx.families if method == name)
        # a method without families (None) searches everything when it was on the front
        return None if None in mine else mine

    def family(self, config: Any) -> Hashable:
        name, inner = config
        return name, self.component(name).family(inner)

    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        name, inner = config
        self.component(name).describe(ctx, inner, entry)
        entry.method = name

    def exact_error(self, module: nn.Module, entry: LayerPlan, **kwargs: Any) -> float:
        return self.component(entry.method).exact_error(module, entry, **kwargs)

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        return self.component(entry.method).build(module, entry, decompose=decompose)
