"""Swap the layers a plan compresses: ``apply_`` (in place) and ``compress`` (on a copy)."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from gkpd.methods import ModelMethod, get_method
from gkpd.plan import CompressionPlan, plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def check_plan_fits(model: nn.Module, compression_plan: CompressionPlan) -> None:
    """Raise ``ValueError`` unless every planned layer exists in ``model`` with the planned
    type and weight shape (a plan made for another architecture is refused whole)."""
    if not isinstance(compression_plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(compression_plan).__name__}")
    modules = dict(model.named_modules())
    problems = []
    for entry in compression_plan.layers:
        module = modules.get(entry.name)
        if module is None:
            problems.append(f"no module named {entry.name!r}")
        elif type(module).__name__ != entry.module_type:
            problems.append(
                f"{entry.name!r} is a {type(module).__name__}, the plan expects {entry.module_type}"
            )
        elif tuple(module.weight.shape) != tuple(entry.weight_shape):
            problems.append(
                f"{entry.name!r} has weight shape {tuple(module.weight.shape)}, the plan expects "
                f"{tuple(entry.weight_shape)}"
            )
    if problems:
        shown = "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else "")
        raise ValueError(
            f"the plan (made for a {compression_plan.model_type}) does not fit this "
            f"{type(model).__name__}: {shown}"
        )


def apply_(model: nn.Module, compression_plan: CompressionPlan, *, decompose: bool = True):
    """Replace, in place, every layer the plan compresses; returns ``model``.

    With ``decompose`` (the default) the new layers are initialized from the dense weights;
    without, they are built with the planned shapes and fresh weights, ready for
    ``load_state_dict`` (what :func:`gkpd.load` does). The whole plan is checked against
    the model before anything is changed.
    """
    check_plan_fits(model, compression_plan)
    whole_model = get_method(compression_plan.method)
    if isinstance(whole_model, ModelMethod):  # whole-model methods (prune) replay the plan
        return whole_model.apply_model(model, compression_plan, decompose=decompose)
    replacements = []
    for entry in compression_plan.compressed_layers:
        method = get_method(entry.method)
        module = model.get_submodule(entry.name)
        replacement = method.build(module, entry, decompose=decompose)
        replacement.train(module.training)
        replacements.append((entry.name, replacement))
    for name, replacement in replacements:
        _set_submodule(model, name, replacement)
    return model


def compress(model: nn.Module, example_input: Any, **options: Any):
    """Plan and apply on a deep copy: ``(compressed_model, plan)``; ``model`` is untouched.

    ``options`` are those of :func:`gkpd.plan` (``ratio``, ``method``, ``strategy``, ...).
    """
    compression_plan = plan(model, example_input, **options)
    compressed = apply_(copy.deepcopy(model), compression_plan)
    return compressed, compression_plan
