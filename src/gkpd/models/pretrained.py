"""Trained weights as safetensors plus a JSON card that says how they were made."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gkpd.files import atomic_write, atomic_write_json
from gkpd.models.cards import CARD_FILE, WEIGHTS_FILE, read_card
from gkpd.models.registry import create
from gkpd.state_dicts import check_state_dict_matches

WEIGHTS_DIR = Path(__file__).parent / "weights"


def save_trained(directory: str | Path, model: nn.Module, card: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` and ``model.json`` (``card`` must name ``architecture``)."""
    if "architecture" not in card:
        raise ValueError("card must name the 'architecture' (a gkpd.models name)")
    directory = Path(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp))
    atomic_write_json(directory / CARD_FILE, card, indent=2, sort_keys=True)
    return directory


def load_trained(weights: str | Path, card_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the architecture the card names and load the safetensors weights into it."""
    weights, card_path = Path(weights), Path(card_path)
    card = read_card(card_path)
    model = create(card["architecture"], **card.get("model_kwargs", {}))
    if not weights.is_file():
        raise FileNotFoundError(f"weights file {weights} does not exist")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"weights file {weights} is corrupt or truncated: {error}") from error
    check_state_dict_matches(model, state, str(weights))
    model.load_state_dict(state)
    model.eval()
    return model, card


def pretrained_names() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.json"))


def load_pretrained(name: str, *, with_card: bool = False):
    """A shipped trained model by name, e.g. ``"resnet32_fashion_mnist"``, in eval mode."""
    card_path = WEIGHTS_DIR / f"{name}.json"
    if not card_path.is_file():
        raise ValueError(
            f"no shipped weights named {name!r}; "
            f"available: {', '.join(pretrained_names()) or 'none'}"
        )
    model, card = load_trained(WEIGHTS_DIR / f"{name}.safetensors", card_path)
    return (model, card) if with_card else model
