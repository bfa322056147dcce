"""Named variants of a compression method for the accuracy benchmark (``gkpd-plain``, …)."""

from __future__ import annotations

from typing import Any

import torch

# Named variants of a method: (method, the options of gkpd.compress they pin). A variant keeps
# its settings when the method's defaults move, so a recorded row can be run again as it was.
# A "calibration" option holds the settings of a gkpd.Calibration; the bench gives it its
# calibration images (a fixed draw from the training split).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # GKPD as planned before the accuracy campaign (issue #12): plain NKP factors, uniform plan
    "gkpd-plain": ("gkpd", {}),
    # data-aware factors (whitened on 512 training images), shapes and ranks as gkpd-plain's
    "gkpd-whiten": ("gkpd", {"calibration": {"samples": 512, "select": False}}),
    # ... and shapes, ranks and the allocation ranked by output error on those images
    "gkpd-whiten-select": ("gkpd", {"calibration": {"samples": 512, "select": True}}),
    # ... each layer fitted to the original outputs from the compressed model's inputs
    "gkpd-whiten-sequential": (
        "gkpd", {"calibration": {"samples": 512, "select": False, "sequential": True}}
    ),
    # the data-aware baseline: SVD truncated in the whitening of the same 512 images
    # (activation-aware low rank), ranks as svd's
    "svd-whiten": ("svd", {"calibration": {"samples": 512, "select": False}}),
}


def _variant(name: str) -> tuple[str, dict[str, Any]]:
    """``(method, pinned options)`` of a variant; a plain method name is its own variant."""
    return VARIANTS.get(name, (name, {}))


def base_method(name: str) -> str:
    """The method a method or variant ``name`` runs (``gkpd-whiten``: ``gkpd``)."""
    return _variant(name)[0]


def needs_calibration(name: str) -> bool:
    """Whether the method or variant ``name`` fits its factors to calibration inputs."""
    return "calibration" in _variant(name)[1]


def compress_options(name: str, calibration: torch.Tensor | None) -> tuple[str, dict[str, Any]]:
    """The method a method or variant ``name`` runs and its options of ``gkpd.compress``; a
    variant's ``calibration`` settings get the ``calibration`` inputs."""
    method, options = _variant(name)
    options = dict(options)
    if "calibration" in options:
        from gkpd.calibration import Calibration

        if calibration is None:
            raise ValueError(f"method {name!r} needs calibration images: pass calibration= "
                             "to run_accuracy")
        options["calibration"] = Calibration(calibration, **options["calibration"])
    return method, options
