"""Compression methods behind one plan/apply interface: ``get_method(name)``, and
``register_method`` for methods defined elsewhere (see :mod:`gkpd.methods.base` for the two
kinds of method, :class:`LayerMethod` and :class:`ModelMethod`)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from gkpd.methods.auto import Auto
from gkpd.methods.base import (
    DEFAULT_FINETUNE_LR,
    LayerContext,
    LayerMethod,
    Method,
    ModelMethod,
)
from gkpd.methods.cp import CP
from gkpd.methods.gkpd import GKPD, KroneckerConfig
from gkpd.methods.gkpd_tucker import GKPDTucker
from gkpd.methods.pruning import Prune
from gkpd.methods.svd import SVD
from gkpd.methods.tensor_ring import TensorRing
from gkpd.methods.tensor_train import TensorTrain
from gkpd.methods.tucker import Tucker
from gkpd.transposed_linear import mark_like

_METHODS: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Make ``method`` (an instance of a :class:`LayerMethod` or :class:`ModelMethod`
    subclass) available by its ``name`` to :func:`gkpd.plan`, ``apply_`` and ``load``.

    A name already taken is refused unless ``replace``. Returns ``method``.
    """
    if isinstance(method, type):
        raise TypeError(f"register_method takes a method instance, got the class {method.__name__}")
    if not isinstance(method, LayerMethod | ModelMethod):
        raise TypeError(
            "a method must be an instance of a gkpd.methods.LayerMethod or ModelMethod "
            f"subclass, got {type(method).__name__}"
        )
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"method {type(method).__name__} has no name (a non-empty str)")
    if name == "dense":
        raise ValueError("'dense' marks a layer left as it is in a plan; it is not a method name")
    if name in _METHODS and not replace:
        raise ValueError(
            f"a method named {name!r} is already registered ({type(_METHODS[name]).__name__}); "
            "pass replace=True to replace it"
        )
    _METHODS[name] = method
    return method


_gkpd, _svd, _tucker = GKPD(), SVD(), Tucker()
for _method in (_gkpd, _svd, _tucker, GKPDTucker(), CP(), TensorTrain(), TensorRing(), Prune(),
                Auto((_gkpd, _tucker, _svd))):
    register_method(_method)
del _method, _gkpd, _svd, _tucker


def method_names() -> list[str]:
    return sorted(_METHODS)


def layer_methods() -> list[LayerMethod]:
    """The registered layer methods (whose ``supports`` says which modules they can take),
    whether or not their optional dependencies are installed."""
    return [m for m in _METHODS.values() if isinstance(m, LayerMethod)]


def data_aware_methods() -> list[str]:
    """Names of the methods that plan with calibration data (``LayerMethod.data_aware``)."""
    return [name for name in method_names() if _METHODS[name].data_aware]


def finetune_lr(methods: Iterable[str]) -> float:
    """The learning rate to fine-tune a model compressed by ``methods`` (a plan's method names;
    "dense" and names not registered here are passed over): the smallest of their
    ``finetune_lr``, so that the most delicate layers are not thrown off; the default 0.01
    when none is known."""
    known = [_METHODS[m].finetune_lr for m in methods if m in _METHODS]
    return min(known, default=DEFAULT_FINETUNE_LR)


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(method_names())}")
    method = _METHODS[name]
    method.check_available()  # an optional dependency: say so before any work
    return method


def build_replacement(module: nn.Module, entry, *, decompose: bool, **options) -> nn.Module:
    """What the entry's method builds from ``module`` (``options``: its ``build``'s), in
    ``module``'s training mode, frozen where ``module`` is (parameters named ``bias`` as its
    bias, the others, the factors, as its weight), marked where ``module`` stands for a
    transposed linear (:mod:`gkpd.transposed_linear`)."""
    replacement = get_method(entry.method).build(module, entry, decompose=decompose, **options)
    replacement.train(module.training)
    mark_like(replacement, module)  # a Conv1D's linear: merged back to a Conv1D
    frozen = {kind for kind in ("weight", "bias")
              if getattr(module, kind, None) is not None
              and not getattr(module, kind).requires_grad}
    if frozen:
        for name, parameter in replacement.named_parameters():
            kind = "bias" if name.rsplit(".", 1)[-1] == "bias" else "weight"
            if kind in frozen:
                parameter.requires_grad_(False)
    return replacement


def replace_layers(model: nn.Module, entries: Iterable, decompose: bool) -> None:
    """Replace, in place and unchecked, the layer at each plan entry's name by what the
    entry's method builds from it (``decompose``: from its weights, else fresh;
    :func:`build_replacement`). The attention and recurrent layers the entries reach into
    must be unpacked already, as ``gkpd.apply_`` and the planner leave them."""
    replacements = []
    for entry in entries:
        module = model.get_submodule(entry.name)
        replacements.append((entry.name, build_replacement(module, entry, decompose=decompose)))
    for name, replacement in replacements:
        model.set_submodule(name, replacement)


__all__ = [
    "Auto",
    "CP",
    "GKPD",
    "GKPDTucker",
    "SVD",
    "KroneckerConfig",
    "LayerContext",
    "LayerMethod",
    "Method",
    "ModelMethod",
    "Prune",
    "TensorRing",
    "TensorTrain",
    "Tucker",
    "build_replacement",
    "data_aware_methods",
    "finetune_lr",
    "get_method",
    "layer_methods",
    "method_names",
    "register_method",
    "replace_layers",
]
