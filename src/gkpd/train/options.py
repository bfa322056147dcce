"""What a training run is told: the optimisation and distillation settings (:class:`FitConfig`,
recorded in every checkpoint) and where it reads and writes, with the code it calls
(:class:`FitRun`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gkpd.train.objectives import LossFn, check_distance

__all__ = ["FitConfig", "FitRun"]


OPTIMIZERS = ("sgd", "adamw")


@dataclass
class FitConfig:
    """The settings of a run. ``optimizer``: ``"sgd"`` (with ``momentum``, ``nesterov``) or
    ``"adamw"`` (the usual choice for transformers; ``momentum``/``nesterov`` unused); weight
    decay applies to weights, not to biases and norms. ``feature_pairs`` (student module name
    -> teacher module name) add ``feature_weight`` times the ``feature_loss`` (``"mse"`` or
    ``"cosine"``, :func:`gkpd.train.objectives.state_distance`) between those modules'
    outputs when a teacher is given."""

    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for "step"
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    alpha: float = 0.9  # weight of the distillation term when a teacher is given
    temperature: float = 4.0
    feature_weight: float = 1.0
    feature_pairs: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    # after the fields above, which callers may pass by position
    optimizer: str = "sgd"
    feature_loss: str = "mse"

    def validate(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        # (name, lowest, highest, whether the lowest itself is allowed)
        for name, low, high, low_ok in (
            ("lr", 0.0, math.inf, False), ("momentum", 0.0, 1.0, True),
            ("weight_decay", 0.0, math.inf, True), ("gamma", 0.0, math.inf, False),
            ("warmup_epochs", 0.0, math.inf, True), ("label_smoothing", 0.0, 1.0, True),
            ("alpha", 0.0, 1.0, True), ("temperature", 0.0, math.inf, False),
            ("feature_weight", 0.0, math.inf, True),
        ):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and low <= value <= high
                    and (low_ok or value > low)):
                bound = f"{'>=' if low_ok else '>'} {low:g}"
                rule = f"in [{low:g}, {high:g}]" if math.isfinite(high) else bound
                raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")
        if self.label_smoothing == 1.0:
            raise ValueError("label_smoothing must be below 1, got 1.0")
        if not (isinstance(self.milestones, tuple | list) and all(
                isinstance(m, int | float) and not isinstance(m, bool) and 0.0 <= m <= 1.0
                for m in self.milestones)):
            raise ValueError(f"milestones must be a sequence of fractions of training in "
                             f"[0, 1], got {self.milestones!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {self.nesterov!r}")
        if not (isinstance(self.feature_pairs, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.feature_pairs.items())):
            raise TypeError("feature_pairs must map student module names to teacher module "
                            f"names (str -> str), got {self.feature_pairs!r:.200}")
        check_distance(self.feature_loss, "feature_loss")

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = int(self.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(progress >= m for m in self.milestones)
        return self.lr


@dataclass(frozen=True)
class FitRun:
    """The parts of :func:`gkpd.train.fit` that are not settings of the optimisation: the
    teacher, the evaluation data, the checkpoint directory and whether to resume from it,
    the device, whether to show progress bars, the code that scores a batch:
    ``loss_fn`` (:data:`gkpd.train.objectives.LossFn`, in place of the classification loss)
    and ``metrics`` (name -> a function of the same signature, averaged over
    ``eval_loader``), and ``after_epoch``: called with each epoch's record once it is
    evaluated and checkpointed, on every rank. It may resize the training loader's draw for
    the next epoch (the learning-rate schedule follows the fraction of training done); the
    main job does that to keep to its time budget. Code is not state: checkpoints do not
    hold it."""

    teacher: nn.Module | None = None
    eval_loader: DataLoader | None = None
    checkpoint_dir: str | Path | None = None
    resume: bool = False
    device: str | torch.device | None = None
    progress: bool = True
    loss_fn: LossFn | None = None
    metrics: Mapping[str, LossFn] | None = None
    after_epoch: Callable[[dict[str, Any]], None] | None = None
