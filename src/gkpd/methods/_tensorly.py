"""TensorLy, imported lazily (an optional dependency: ``gkpd[baselines]``) and used only
through :func:`pytorch_backend`, never by switching the global backend."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


def require_tensorly(method: str) -> ModuleType:
    """``tensorly``, or an ``ImportError`` naming ``method`` and the extra to install."""
    try:
        import tensorly
        import tensorly.decomposition  # noqa: F401  (the decompositions the methods use)
    except ImportError as error:
        raise ImportError(
            f"method {method!r} needs TensorLy: pip install 'gkpd[baselines]'"
        ) from error
    return tensorly


@contextmanager
def pytorch_backend(method: str) -> Iterator[ModuleType]:
    """``tensorly`` with the PyTorch backend for the duration of the block (thread-local,
    restored afterwards). TensorLy's notices about ranks it shortens are silenced: every
    method states its own ranks and checks them before calling it."""
    tl = require_tensorly(method)
    with tl.backend_context("pytorch"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"tensorly(\.|$)")
        yield tl
