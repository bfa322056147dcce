"""The reference ``student``: a narrower dense network of the teacher's family with about the
parameter count of the compressed models, trained from random weights."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_width_knob(teacher: nn.Module, architecture: str | None) -> tuple[int, ...]:
    """The teacher's ``widths``; a ValueError when its family cannot be made narrower."""
    widths = getattr(teacher, "widths", None)
    if architecture is None or not isinstance(widths, tuple) or not widths:
        name = architecture or type(teacher).__name__
        raise ValueError(
            f"method 'student' needs a model family with a width knob (a `widths` keyword, "
            f"e.g. the CIFAR ResNets resnet20/32/...); {name} has none"
        )
    return widths


def candidate_widths(base: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every width tuple that scales ``base`` by ``k / base[-1]`` (k = 1 .. base[-1]), rounded."""
    seen: dict[tuple[int, ...], None] = {}
    for k in range(1, base[-1] + 1):
        seen[tuple(max(1, round(b * k / base[-1])) for b in base)] = None
    return list(seen)


def pick_student_widths(
    teacher: nn.Module,
    architecture: str | None,
    model_kwargs: dict[str, Any],
    target_params: float,
) -> tuple[tuple[int, ...], int]:
    """The widths whose network's parameter count is closest to ``target_params``."""
    from gkpd import models

    base = check_width_knob(teacher, architecture)
    if not target_params > 0:
        raise ValueError(f"target_params must be > 0, got {target_params!r}")
    best: tuple[float, tuple[int, ...], int] | None = None
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        for widths in candidate_widths(base):
            params = _params(models.create(architecture, **model_kwargs, widths=widths))
            gap = abs(params - target_params)
            if best is None or gap < best[0]:
                best = (gap, widths, params)
    assert best is not None  # candidate_widths is never empty
    return best[1], best[2]


def build_student(
    teacher: nn.Module,
    architecture: str | None,
    model_kwargs: dict[str, Any],
    target_params: float,
    *,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised narrower network and its ``model_kwargs`` (with ``widths``)."""
    from gkpd import models

    widths, params = pick_student_widths(teacher, architecture, model_kwargs, target_params)
    kwargs = {**model_kwargs, "widths": list(widths)}
    torch.manual_seed(seed)
    student = models.create(architecture, **kwargs)
    log.info(
        "student %s widths %s: %d parameters (target %.0f, %+.1f%%)",
        architecture,
        widths,
        params,
        target_params,
        100.0 * (params - target_params) / target_params,
    )
    return student, kwargs
