"""Losses for training with and without a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y)`` (Hinton et al. 2015).

    The T² factor keeps the soft term's gradients on the scale of the hard term's.
    With ``alpha=1`` the targets are not used and may be ``None``.
    """
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature**2)
    if alpha >= 1.0:
        return soft
    if targets is None:
        raise ValueError("targets are needed when alpha < 1")
    hard = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard
