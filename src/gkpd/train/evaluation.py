"""``evaluate``: a model's mean loss (and accuracy, or the user's metrics) over a loader."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gkpd.train.batches import (
    batch_size,
    call_model,
    class_scores,
    progress_bar,
    split_batch,
    to_device,
)
from gkpd.train.objectives import LossFn

RESERVED = ("loss", "accuracy", "count")


def scalar(value: Any, what: str) -> torch.Tensor:
    """``value`` if it is a one-element tensor, else a ``TypeError`` naming ``what``."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{what} must return a scalar tensor, got {shape}")
    return value.reshape(())


def check_metrics(metrics: Mapping[str, LossFn] | None) -> None:
    if metrics is None:
        return
    if not isinstance(metrics, Mapping) or not all(callable(m) for m in metrics.values()):
        raise TypeError("metrics must be a dict of name -> function(output, teacher_output, "
                        f"batch), got {metrics!r:.200}")
    bad = sorted(set(metrics) & set(RESERVED))
    if bad:
        raise ValueError(f"metrics may not be named {bad}: {list(RESERVED)} are reported anyway")


@contextmanager
def _eval_mode(*models: nn.Module | None):
    present = [m for m in models if m is not None]
    modes = [m.training for m in present]
    for m in present:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(present, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    teacher: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, LossFn] | None = None,
) -> dict[str, float]:
    """Mean loss of ``model`` over ``loader`` (batches as :mod:`gkpd.train.batches` reads
    them), with ``count``, the number of samples.

    Without ``loss_fn``: the cross-entropy and the top-1 ``accuracy`` (percent) over
    ``(inputs, targets)`` batches. With ``loss_fn``
    (``loss_fn(output, teacher_output, batch)``, :data:`gkpd.train.objectives.LossFn`): its
    mean, and no accuracy; ``teacher_output`` is ``None`` without a ``teacher``. ``metrics``
    (name -> a function of the same signature) are averaged the same way and reported under
    their names. Means over batches are weighted by batch size.
    """
    check_metrics(metrics)
    device = (
        torch.device(device)
        if device is not None
        else next((p.device for p in model.parameters()), torch.device("cpu"))
    )
    # a classifier's loss is cross-entropy on the targets: the teacher has nothing to add
    scored_with_teacher = teacher is not None and (loss_fn is not None or bool(metrics))
    sums = dict.fromkeys(("loss", *(metrics or {})), 0.0)
    correct = seen = 0
    with _eval_mode(model, teacher):
        for batch in progress_bar(loader, progress, "eval"):
            batch = to_device(batch, device)
            inputs, targets = split_batch(batch)
            output = call_model(model, inputs)
            teacher_output = call_model(teacher, inputs) if scored_with_teacher else None
            count = batch_size(inputs)
            if loss_fn is None:
                if targets is None:
                    raise ValueError(
                        "evaluate without loss_fn needs (inputs, targets) batches; "
                        "pass loss_fn= for a model without labels"
                    )
                scores = class_scores(output)
                sums["loss"] += F.cross_entropy(scores, targets, reduction="sum").item()
                correct += int((scores.argmax(1) == targets).sum().item())
            else:
                loss = scalar(loss_fn(output, teacher_output, batch), "loss_fn")
                sums["loss"] += loss.item() * count
            for name, metric in (metrics or {}).items():
                value = scalar(metric(output, teacher_output, batch), f"metric {name!r}")
                sums[name] += value.item() * count
            seen += count
    if seen == 0:
        raise ValueError("loader yields no samples")
    result = {"loss": sums.pop("loss") / seen}
    if loss_fn is None:
        result["accuracy"] = 100.0 * correct / seen
    result.update({name: total / seen for name, total in sums.items()})
    result["count"] = int(seen)
    return result
