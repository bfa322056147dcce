"""Model-agnostic training: ``fit``, ``evaluate``, distillation, checkpoints, torchrun."""

from gkpd.train.checkpoint import ResumeMismatch
from gkpd.train.evaluation import evaluate
from gkpd.train.loop import FitConfig, fit
from gkpd.train.losses import distillation_loss
from gkpd.train.objectives import hidden_state_loss, token_logits_loss

__all__ = [
    "FitConfig", "ResumeMismatch", "distillation_loss", "evaluate", "fit", "hidden_state_loss",
    "token_logits_loss",
]
