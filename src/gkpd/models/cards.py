"""Model cards: the JSON that says how a model was made, and the file names it is saved under.

A card names the dense ``architecture`` (a :mod:`gkpd.models` name) and its ``model_kwargs``,
the data set, its normalization and the ``input_size``; the compression, fine-tuning and
merge steps add what they did. Trained weights (:func:`gkpd.models.save_trained`) and
compressed saves (:func:`gkpd.io.save`) both write ``model.safetensors`` + ``model.json``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_FILE",
    "CARRIED_KEYS",
    "WEIGHTS_FILE",
    "carried",
    "compressed_card",
    "example_input",
    "finetuned_card",
    "merged_card",
    "now",
    "read_card",
]

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"

# card keys that describe the dense architecture and its data; carried from teacher to student
CARRIED_KEYS = ("architecture", "model_kwargs", "dataset", "normalization", "input_size")


def read_card(path: str | Path) -> dict[str, Any] | None:
    """The card in ``path``: a card file, or a model directory (``None`` when the directory
    holds no :data:`CARD_FILE`). A card that is not JSON or names no ``architecture`` is a
    ``ValueError``."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
        if not path.is_file():
            return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"model card {path} is unreadable or not JSON: {error}") from error
    if not isinstance(card, dict) or "architecture" not in card:
        raise ValueError(f"model card {path} does not name an 'architecture'")
    return card


def example_input(card: dict[str, Any], batch: int = 1):
    """A batch of zeros of the card's ``input_size`` (channels, *spatial)."""
    import torch

    size = card.get("input_size")
    if not isinstance(size, list) or not size or not all(isinstance(s, int) for s in size):
        raise ValueError(
            "the model's card has no 'input_size' (channels, height, width); cannot build an "
            "example input"
        )
    return torch.zeros(batch, *size)


def now() -> str:
    """The ``created`` time of a card: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def carried(card: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keys of ``card`` a derived model keeps: :data:`CARRIED_KEYS`, then ``extra``."""
    return {k: card[k] for k in (*CARRIED_KEYS, *extra) if k in card}


def compressed_card(
    card: dict[str, Any],
    plan,
    *,
    teacher: str,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    command: str,
) -> dict[str, Any]:
    """The card of ``plan`` applied to the model of ``card``; ``teacher`` names that model."""
    import torch

    new_card = carried(card)
    new_card["compression"] = {
        **plan.totals(),
        "layers": len(plan.layers),
        "include": include or [],
        "exclude": exclude or [],
        "objective": plan.objective,
        **{k: v for k, v in plan.options.items() if k.startswith("latency_")},
    }
    new_card["teacher"] = {
        "model": teacher,
        "architecture": card.get("architecture"),
        "test_accuracy": card.get("test_accuracy"),
    }
    new_card["command"] = command
    new_card["created"] = now()
    new_card["torch_version"] = torch.__version__
    return new_card


def finetuned_card(
    card: dict[str, Any], finetune: dict[str, Any], *, command: str
) -> dict[str, Any]:
    """The card of the model of ``card`` after fine-tuning; ``finetune`` records how (its
    ``history`` is the list of epochs :func:`gkpd.train.finetune.finetune` returns)."""
    import torch

    new_card = carried(card, ("compression", "teacher"))
    new_card["finetune"] = finetune
    new_card["test_accuracy"] = finetune["history"][-1]["eval_accuracy"]
    new_card["command"] = command
    new_card["created"] = now()
    new_card["torch_version"] = torch.__version__
    return new_card


def merged_card(card: dict[str, Any], *, merged_from: str, command: str) -> dict[str, Any]:
    """The card of the model of ``card`` merged back into dense layers."""
    new_card = carried(card, ("compression", "teacher", "finetune", "test_accuracy", "dataset"))
    new_card["merged_from"] = merged_from
    new_card["command"] = command
    new_card["created"] = now()
    return new_card
