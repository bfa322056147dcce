"""Training objectives for models that are not classifiers: a user's loss function, and the
teacher's hidden states as targets.

A loss function (:data:`LossFn`) is called as ``loss_fn(student_output, teacher_output, batch)``
and returns a scalar tensor: ``student_output`` is what the model returned on the batch's
inputs (a tensor, a tuple, a dict or a Hugging Face ``ModelOutput``), ``teacher_output`` the
teacher's on the same inputs (``None`` without a teacher), ``batch`` the batch on the training
device. It is code, not state: a checkpoint does not hold it, and a resumed run must be given
the same function again.

:func:`hidden_state_loss` is such a function for the last hidden state, per token or mean-pooled
over the tokens (a sentence embedding, as sentence-transformers models pool it);
:func:`token_logits_loss` distils a language model's next-token (or masked-token)
distributions, as KnGPT2 distils GPT-2's; the states of
chosen intermediate layers are the ``feature_pairs`` of :class:`gkpd.train.FitConfig` (taps on
named modules, :mod:`gkpd.train.features`), measured by the same :func:`state_distance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from gkpd.train.batches import split_batch

LossFn = Callable[[Any, Any, Any], torch.Tensor]

DISTANCES = ("mse", "cosine")
POOLINGS = ("tokens", "mean")
MASK_KEY = "attention_mask"
DECODER_MASK_KEY = "decoder_attention_mask"


def check_distance(kind: str, argument: str) -> None:
    if kind not in DISTANCES:
        raise ValueError(f"{argument} must be one of {list(DISTANCES)}, got {kind!r}")


def state_tensor(output: Any, what: str) -> torch.Tensor:
    """The hidden state a model's or a module's output carries: the tensor itself; a
    mapping's (a Hugging Face ``ModelOutput``'s) ``last_hidden_state``; a tuple's first
    element."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "last_hidden_state" in output:
            return output["last_hidden_state"]
        raise ValueError(
            f"{what}: the output is a mapping without 'last_hidden_state' "
            f"(keys {list(output)}); pass a loss_fn that picks the tensor to compare"
        )
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"{what}: expected a tensor, a tuple starting with one or a mapping with "
        f"'last_hidden_state', got {type(output).__name__}"
    )


def attention_mask(batch: Any, output: Any = None) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (1 for tokens, 0 for padding), where its inputs are a
    mapping that holds one. For an encoder-decoder's ``output`` (one with an
    ``encoder_last_hidden_state``: T5, BART), whose states and logits are the decoder's, the
    ``decoder_attention_mask`` instead (``None`` without one: the encoder's mask would mark
    the wrong positions)."""
    inputs, _ = split_batch(batch)
    if isinstance(inputs, Mapping):
        decoder = isinstance(output, Mapping) and "encoder_last_hidden_state" in output
        mask = inputs.get(DECODER_MASK_KEY if decoder else MASK_KEY)
        return mask if isinstance(mask, torch.Tensor) else None
    return None


def state_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    kind: str,
    mask: torch.Tensor | None = None,
    what: str = "hidden states",
) -> torch.Tensor:
    """The mean distance between two states of one shape: ``"mse"``, the mean squared error;
    ``"cosine"``, one minus the cosine similarity along the last dimension (the hidden size),
    averaged over the other positions.

    Where ``mask`` has the states' leading shape (``(batch, tokens)`` against states of
    ``(batch, tokens, hidden)``), only the positions it marks count; a state of another shape
    (a pooled output) is not a sequence and is compared everywhere.
    """
    check_distance(kind, "kind")
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} and teacher shape "
            f"{tuple(teacher.shape)} differ"
        )
    teacher = teacher.to(student.dtype)
    masked = (
        mask is not None and mask.dim() < student.dim()
        and tuple(mask.shape) == tuple(student.shape[: mask.dim()])
    )
    if kind == "cosine":
        errors = 1.0 - F.cosine_similarity(student, teacher, dim=-1)
    elif masked:
        errors = (student - teacher).pow(2)
    else:
        return F.mse_loss(student, teacher)
    if not masked:
        return errors.mean()
    if errors.dim() > mask.dim():  # one figure per position: the mean over its other dims
        errors = errors.flatten(mask.dim()).mean(-1)
    return masked_mean(errors, mask)


def masked_mean(errors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``errors`` (one per position) over the positions ``mask`` marks (its shape)."""
    weights = mask.to(errors.dtype)
    return (errors * weights).sum() / weights.sum().clamp_min(1.0)


def mean_pool(state: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of a ``(batch, tokens, hidden)`` state over each sequence's real tokens
    (``mask`` 1, of shape ``(batch, tokens)``; every token without a mask): ``(batch, hidden)``,
    the sentence embedding of mean-pooling models (all-MiniLM-L6-v2, before normalisation)."""
    if state.dim() != 3:
        raise ValueError(f"mean pooling takes a (batch, tokens, hidden) state, got shape "
                         f"{tuple(state.shape)}")
    if mask is None:
        return state.mean(1)
    if tuple(mask.shape) != tuple(state.shape[:2]):
        raise ValueError(f"attention mask shape {tuple(mask.shape)} does not match the state's "
                         f"(batch, tokens) {tuple(state.shape[:2])}")
    weights = mask.to(state.dtype).unsqueeze(-1)
    return (state * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def hidden_state_loss(kind: str = "cosine", pooling: str = "tokens") -> LossFn:
    """A loss function (:data:`LossFn`) that takes the teacher's last hidden state as the
    target: :func:`state_distance` between the student's and the teacher's
    (:func:`state_tensor` of each output). ``pooling="tokens"``: over each token of the
    batch's attention mask; ``"mean"``: between the states mean-pooled over those tokens
    (:func:`mean_pool`), the sentence embeddings of a mean-pooling model."""
    check_distance(kind, "kind")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")

    def loss(student_output: Any, teacher_output: Any, batch: Any) -> torch.Tensor:
        if teacher_output is None:
            raise ValueError("hidden_state_loss compares with a teacher: pass teacher=")
        student = state_tensor(student_output, "student output")
        teacher = state_tensor(teacher_output, "teacher output")
        mask = attention_mask(batch, student_output)
        if pooling == "mean":
            return state_distance(mean_pool(student, mask), mean_pool(teacher, mask),
                                  kind=kind, what="mean-pooled last hidden state")
        return state_distance(student, teacher, kind=kind, mask=mask, what="last hidden state")

    loss.__qualname__ = f"hidden_state_loss({kind!r}, pooling={pooling!r})"
    return loss


def logits_tensor(output: Any, what: str) -> torch.Tensor:
    """The logits a model's output carries: the tensor itself; a mapping's (a Hugging Face
    ``ModelOutput``'s) ``logits``; a tuple's first element."""
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        raise ValueError(f"{what}: the output is a mapping without 'logits' (keys "
                         f"{list(output)}); pass a loss_fn that picks the tensor to compare")
    return state_tensor(output, what)


def token_logits_loss(temperature: float = 2.0) -> LossFn:
    """A loss function (:data:`LossFn`) that distils a language model's token predictions:
    the KL divergence of the student's softened distribution over the vocabulary from the
    teacher's, at each token of the batch's attention mask (every token without one), times
    ``temperature²`` so that its gradients keep their scale (Hinton et al., 2015). The logits
    are ``(batch, tokens, vocabulary)`` (``logits`` of a causal or masked LM's output)."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not (
        temperature > 0 and math.isfinite(temperature)
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")

    def loss(student_output: Any, teacher_output: Any, batch: Any) -> torch.Tensor:
        if teacher_output is None:
            raise ValueError("token_logits_loss compares with a teacher: pass teacher=")
        student = logits_tensor(student_output, "student output")
        teacher = logits_tensor(teacher_output, "teacher output").to(student.dtype)
        if student.shape != teacher.shape or student.dim() != 3:
            raise ValueError(f"token logits: expected student and teacher logits of one shape "
                             f"(batch, tokens, vocabulary), got {tuple(student.shape)} and "
                             f"{tuple(teacher.shape)}")
        per_token = F.kl_div(F.log_softmax(student / temperature, -1),
                             F.log_softmax(teacher / temperature, -1),
                             reduction="none", log_target=True).sum(-1)
        mask = attention_mask(batch, student_output)
        if mask is None or tuple(mask.shape) != tuple(per_token.shape):
            return per_token.mean() * temperature**2
        return masked_mean(per_token, mask) * temperature**2

    loss.__qualname__ = f"token_logits_loss(temperature={temperature!r})"
    return loss
