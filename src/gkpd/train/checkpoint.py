"""Atomic writes and pickle-free reads of training state.

``atomic_write``/``atomic_write_text`` live in :mod:`gkpd.files` and
``check_state_dict_matches`` in :mod:`gkpd.state_dicts`; they are re-exported here for code
that still imports them from this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gkpd.files import atomic_write, atomic_write_text
from gkpd.state_dicts import check_state_dict_matches

__all__ = ["ResumeMismatch", "atomic_write", "atomic_write_text", "check_settings",
           "check_state_dict_matches", "load_state", "save_state"]


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` of plain containers and tensors, written atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`save_state` without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or foreign files
        raise ValueError(
            f"checkpoint {path} is corrupt, truncated, or not a gkpd checkpoint: {error}"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


class ResumeMismatch(ValueError):
    """A resumed run with other settings than its checkpoint's; ``changes`` maps each
    changed setting to ``(recorded, given)``."""

    def __init__(self, path: Path, changes: dict[str, tuple[Any, Any]]) -> None:
        self.changes = changes
        details = "; ".join(f"{k}: {old!r} recorded, {new!r} given"
                            for k, (old, new) in changes.items())
        super().__init__(
            f"checkpoint {path} was written by a run with other settings ({details}); resume "
            "with the recorded settings, or start a new run"
        )


def check_settings(state: dict[str, Any], settings: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume the checkpoint ``state`` (read from ``path``) with other
    ``settings`` than it records (:class:`ResumeMismatch`): the resumed run would silently be
    another run. A setting it does not record is not compared."""
    # checkpoints written before the settings were recorded hold the FitConfig as "config"
    recorded = state.get("settings", state.get("config", {}))
    changes = {k: (recorded[k], v) for k, v in settings.items()
               if k in recorded and recorded[k] != v}
    if changes:
        raise ResumeMismatch(Path(path), changes)
