"""Model-agnostic training: ``fit``, ``evaluate``, distillation, checkpoints, torchrun."""

from gkpd.train.loop import FitConfig, evaluate, fit
from gkpd.train.losses import distillation_loss

__all__ = ["FitConfig", "distillation_loss", "evaluate", "fit"]
