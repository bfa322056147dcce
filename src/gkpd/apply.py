"""Swap the layers a plan compresses: ``apply_`` (in place) and ``compress`` (on a copy)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from gkpd.calibration import Calibration, collect_covariances, collect_cross_moments
from gkpd.inputs import ModelCall, eval_mode
from gkpd.layers.attention import unfuse, unpackable, unpacked
from gkpd.layout import run_in_layout
from gkpd.methods import ModelMethod, build_replacement, get_method, replace_layers
from gkpd.plan import CompressionPlan, plan
from gkpd.plan.select import tied_layers, tied_reason
from gkpd.whiten import corrected_weight


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Deprecated: ``model.set_submodule(name, module)``, torch's own."""
    warnings.warn("gkpd.apply.set_submodule is deprecated: use model.set_submodule(name, "
                  "module)", DeprecationWarning, stacklevel=2)
    model.set_submodule(name, module)


def _require_plan(compression_plan: Any) -> None:
    if not isinstance(compression_plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(compression_plan).__name__}")


def _planned_unpacked(model: nn.Module, compression_plan: CompressionPlan) -> list[str]:
    """Names of the modules of ``model`` that the planner unpacked (attention, recurrent
    layers, transformers' ``Conv1D``: ``gkpd.layers.attention.unpackable``) and plan entries
    name or reach into."""
    _require_plan(compression_plan)
    return [
        name for name, module in model.named_modules()
        if unpackable(module) and any(
            e.name == name or e.name.startswith(f"{name}.") for e in compression_plan.layers
        )
    ]


def check_plan_fits(
    model: nn.Module, compression_plan: CompressionPlan,
    unpacked_attention: dict[str, nn.Module] | None = None,
) -> None:
    """Raise ``ValueError`` unless every planned layer exists in ``model`` with the planned
    type and weight shape (a plan made for another architecture is refused whole), once the
    attention and recurrent layers the plan reaches into are unpacked as ``apply_`` does it
    (``unpacked_attention``: those modules by name, if already built)."""
    _require_plan(compression_plan)
    if unpacked_attention is None:
        unpacked_attention = unpacked(model, _planned_unpacked(model, compression_plan))
    modules = dict(model.named_modules())
    for name, module in unpacked_attention.items():
        modules.update((f"{name}.{child}" if child else name, m)
                       for child, m in module.named_modules())
    tied = tied_layers(model)
    problems = []
    for entry in compression_plan.layers:
        module = modules.get(entry.name)
        if module is None:
            problems.append(f"no module named {entry.name!r}")
        elif entry.compressed and tied_reason(entry.name, tied):
            problems.append(f"{entry.name!r}: {tied_reason(entry.name, tied)}")
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


def apply_(
    model: nn.Module, compression_plan: CompressionPlan, *, decompose: bool = True,
    calibration: Any = None,
):
    """Replace, in place, every layer the plan compresses; returns ``model``.

    With ``decompose`` (the default) the new layers are initialized from the dense weights;
    without, they are built with the planned shapes and fresh weights, ready for
    ``load_state_dict`` (what :func:`gkpd.load` does). The whole plan is checked against
    the model before anything is changed.

    The model then runs in the plan's memory layout (``compression_plan.layout``, see
    :func:`gkpd.layout.run_in_layout`): a latency plan timed fastest in channels_last gets
    its weights converted and converts its inputs on entry, outputs coming back as before.

    A plan made with calibration data (``plan.options["calibration"]``) needs that data again
    as ``calibration`` (a :class:`gkpd.Calibration` or its inputs) to decompose: the factors
    minimise each layer's output error on it, with the damping the plan records. With the
    plan's ``sequential`` setting each layer is whitened on the inputs that the layers
    compressed before it produce.

    An ``nn.MultiheadAttention`` whose projections the plan names becomes an
    :class:`gkpd.layers.attention.UnpackedMultiheadAttention` (the same function, its
    projections layers), and transformer layers with replaced children run through them
    (:func:`gkpd.layers.attention.unfuse`). An ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (or
    one of their cells) the plan reaches into becomes its :mod:`gkpd.layers.recurrent`
    (:mod:`gkpd.layers.recurrent_cells`) equivalent, its gate weights layers, the same way.
    """
    replacements = unpacked(model, _planned_unpacked(model, compression_plan))
    check_plan_fits(model, compression_plan, replacements)
    settings = compression_plan.options.get("calibration")
    calibrated = decompose and settings is not None
    if calibrated and calibration is None:
        raise ValueError(
            "this plan initialises its factors from calibration data "
            f"(options['calibration'] = {settings}): pass calibration= to apply_"
        )
    whole_model = get_method(compression_plan.method)
    for entry in compression_plan.compressed_layers:
        get_method(entry.method)  # an unknown or unavailable method fails before any change
    for name, module in replacements.items():
        model.set_submodule(name, module)
    # the calibration runs the model: a transformer layer holding an unpacked attention must
    # already run through it
    unfuse(model)
    if calibrated:
        _apply_calibrated(model, compression_plan, settings, calibration)
    elif isinstance(whole_model, ModelMethod):  # whole-model methods (prune) replay the plan
        whole_model.apply_model(model, compression_plan, decompose=decompose)
    else:
        replace_layers(model, compression_plan.compressed_layers, decompose)
    model = unfuse(model)
    if compression_plan.layout != "contiguous":
        model = run_in_layout(model, compression_plan.layout)
    return model


def _apply_calibrated(model, compression_plan, settings, calibration) -> None:
    calibration = Calibration.of(calibration)
    entries = compression_plan.compressed_layers
    # entries with plain factors (an embedding's: its inputs are token ids) need no data
    plain = [e for e in entries if e.settings.get("init") != "whitened"]
    entries = [e for e in entries if e.settings.get("init") == "whitened"]
    modules = {e.name: model.get_submodule(e.name) for e in entries}
    sequential = settings["sequential"]
    # both on the original model: its inputs, its outputs
    covariances = {} if sequential else collect_covariances(model, modules, calibration)
    reference = copy.deepcopy(model) if sequential else None
    for entry in plain:
        dense = model.get_submodule(entry.name)
        model.set_submodule(entry.name, build_replacement(dense, entry, decompose=True))
    for entry in entries:  # in the order the forward pass calls them
        module = modules[entry.name]
        if sequential:  # fit the original outputs from the inputs the compressed layers give
            own, cross = collect_cross_moments(
                reference, reference.get_submodule(entry.name), model, module, calibration
            )
            cov, module = own, copy.deepcopy(module)
            with torch.no_grad():
                module.weight.copy_(corrected_weight(module.weight, own, cross))
        else:
            cov = covariances[entry.name]
        model.set_submodule(entry.name, build_replacement(
            module, entry, decompose=True, input_covariance=cov
        ))


def compress(model: nn.Module, example_input: Any, **options: Any):
    """Plan and apply on a deep copy: ``(compressed_model, plan)``; ``model`` is untouched.

    ``example_input`` is a tensor, a tuple of positional or a dict of keyword inputs (as
    :func:`gkpd.plan`); the compressed model is called, and answers, as ``model`` is.
    ``options`` are those of :func:`gkpd.plan` (``ratio``, ``method``, ``strategy``,
    ``calibration``, ...). The compressed model is run once on ``example_input`` (in eval
    mode): where it fails and the dense one ran (a parent reading an attribute its replaced
    child lacks), ``ValueError`` names the layer.
    """
    if options.get("calibration") is not None:  # one object: apply_ reuses plan's statistics
        options["calibration"] = Calibration.of(options["calibration"])
    compression_plan = plan(model, example_input, **options)
    compressed = apply_(
        copy.deepcopy(model), compression_plan, calibration=options.get("calibration")
    )
    _check_runs(compressed, example_input, compression_plan)
    return compressed, compression_plan


def _check_runs(compressed: nn.Module, example_input: Any, compression_plan: CompressionPlan):
    """Raise a clear error now, not at the user's first call, where the compressed model fails
    on the input the dense model was planned on (in eval mode: statistics untouched)."""
    call = ModelCall.of(example_input)
    try:
        with eval_mode(compressed), torch.no_grad():
            call.run(compressed)
    except Exception as error:
        methods = ", ".join(sorted({repr(e.method) for e in compression_plan.compressed_layers}))
        culprit = _missing_attribute_owner(error, compressed)
        where = (f"A module reads {culprit[1]!r} of {culprit[0]!r}, a layer that {methods} "
                 "replaced" if culprit else f"A module may read an attribute of a layer that "
                 f"{methods} replaced")
        raise ValueError(
            f"the compressed model fails on example_input ({call.describe()}), which the dense "
            f"model ran on: {type(error).__name__}: {error}. {where} (the replacements have "
            "the dense layer's `weight`, rebuilt, but not every attribute of it): keep such "
            "layers dense with exclude=[...]"
        ) from error


def _missing_attribute_owner(error: Exception, model: nn.Module) -> tuple[str, str] | None:
    """(name in ``model``, attribute) of the module whose missing attribute ``error`` is, read
    off the frame that raised it (``nn.Module.__getattr__``); ``None`` if it was not one."""
    if not isinstance(error, AttributeError) or error.__traceback__ is None:
        return None
    frame = error.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    owner, attribute = frame.tb_frame.f_locals.get("self"), frame.tb_frame.f_locals.get("name")
    name = next((n for n, m in model.named_modules() if m is owner), None)
    return (name, attribute) if name and isinstance(attribute, str) else None
