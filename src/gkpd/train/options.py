"""What a training run is told: the optimisation and distillation settings (:class:`FitConfig`,
recorded in every checkpoint) and where it reads and writes (:class:`FitRun`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["FitConfig", "FitRun"]


@dataclass
class FitConfig:
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

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

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
    the device, whether to show progress bars, and ``after_epoch``: called with each epoch's
    record once it is evaluated and checkpointed, on every rank. It may resize the training
    loader's draw for the next epoch (the learning-rate schedule follows the fraction of
    training done); the main job does that to keep to its time budget."""

    teacher: nn.Module | None = None
    eval_loader: DataLoader | None = None
    checkpoint_dir: str | Path | None = None
    resume: bool = False
    device: str | torch.device | None = None
    progress: bool = True
    after_epoch: Callable[[dict[str, Any]], None] | None = None
