"""Compression methods behind one plan/apply interface; ``get_method(name)``."""

from __future__ import annotations

from gkpd.methods.base import LayerContext, Method
from gkpd.methods.cp import CP
from gkpd.methods.gkpd import GKPD
from gkpd.methods.pruning import Prune
from gkpd.methods.svd import SVD
from gkpd.methods.tensor_ring import TensorRing
from gkpd.methods.tensor_train import TensorTrain
from gkpd.methods.tucker import Tucker

_METHODS: dict[str, Method] = {
    "gkpd": GKPD(),
    "svd": SVD(),
    "tucker": Tucker(),
    "cp": CP(),
    "tensor_train": TensorTrain(),
    "tensor_ring": TensorRing(),
    "prune": Prune(),
}


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(method_names())}")
    method = _METHODS[name]
    check = getattr(method, "check_available", None)
    if check is not None:  # an optional dependency: say so before any work
        check()
    return method


__all__ = [
    "CP",
    "GKPD",
    "SVD",
    "LayerContext",
    "Method",
    "TensorRing",
    "TensorTrain",
    "Tucker",
    "get_method",
    "method_names",
]
