"""A model named on the command line (or in a script): a zoo name, a save, or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gkpd import models
from gkpd.io import is_saved_model, load
from gkpd.models.cards import CARD_FILE, WEIGHTS_FILE, read_card
from gkpd.state_dicts import check_state_dict_matches
from gkpd.train.checkpoint import load_state

__all__ = ["resolve_model"]


def _create(card: dict[str, Any]) -> nn.Module:
    return models.create(card["architecture"], **card.get("model_kwargs", {}))


def resolve_model(spec: str) -> tuple[nn.Module, dict[str, Any]]:
    """MODEL -> (model, card): a zoo name with shipped weights, a directory written by
    ``gkpd train`` or by :func:`gkpd.io.save` (rebuilt from its card, then loaded with its
    plan), or a ``checkpoint.pt`` written by ``gkpd train``. A spec that names none of these
    is a ``ValueError``."""
    path = Path(spec)
    if path.is_dir() and is_saved_model(path):
        card = read_card(path)
        if card is None:
            raise ValueError(
                f"MODEL directory {path} was saved without a {CARD_FILE} naming its "
                "architecture; load it with gkpd.load(path, model) in Python"
            )
        return load(path, _create(card)), card
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file() and (path / CARD_FILE).is_file():
            return models.load_trained(path / WEIGHTS_FILE, path / CARD_FILE)
        if (path / "checkpoint.pt").is_file():
            path = path / "checkpoint.pt"
        else:
            raise ValueError(
                f"MODEL directory {path} holds neither {WEIGHTS_FILE} + {CARD_FILE} "
                "(gkpd train's result) nor checkpoint.pt"
            )
    if path.is_file() and is_saved_model(path.parent):  # a file of a save: its directory
        return resolve_model(str(path.parent))
    if path.is_file() and path.suffix != ".pt":
        raise ValueError(
            f"MODEL {path} is not a file a model loads from: give the directory written by "
            "gkpd train or gkpd compress, or a checkpoint.pt of gkpd train"
        )
    if path.is_file():
        card_path = path.parent / CARD_FILE
        if not card_path.is_file():
            raise ValueError(
                f"checkpoint {path} has no {CARD_FILE} beside it naming its architecture"
            )
        card = read_card(card_path)
        model = _create(card)
        state = load_state(path)
        weights = state.get("model", state)
        check_state_dict_matches(model, weights, str(path))
        model.load_state_dict(weights)
        return model.eval(), card
    if spec in models.pretrained_names():
        return models.load_pretrained(spec, with_card=True)
    raise ValueError(
        f"MODEL {spec!r} is neither an existing path nor a model with shipped weights "
        f"({', '.join(models.pretrained_names()) or 'none shipped'})"
    )
