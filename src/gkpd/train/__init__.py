"""Model-agnostic training: ``fit``, ``evaluate``, distillation, checkpoints, torchrun."""

from gkpd.train.checkpoint import ResumeMismatch
from gkpd.train.loop import FitConfig, evaluate, fit
from gkpd.train.losses import distillation_loss

__all__ = ["FitConfig", "ResumeMismatch", "distillation_loss", "evaluate", "fit"]
