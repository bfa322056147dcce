"""Save and load a compressed model: plan JSON + safetensors weights, nothing unpickled.

A save is a directory holding

* ``plan.json`` — the :class:`~gkpd.plan.schema.CompressionPlan`, which is all that is needed
  to rebuild the Kronecker modules in the dense architecture without decomposing again;
* ``model.safetensors`` — the state dict of the compressed model;
* ``model.json`` — optional metadata (the "card": architecture, model_kwargs, data set, ...),
  so that the command line can rebuild the dense architecture by name;
* ``manifest.json`` — written last: the size and SHA-256 of each of the files above.

Every file is first written in full beside its place; an earlier save in the directory stays
whole and loadable until all of them are. Then its manifest is removed, the new files are
renamed into place and the new manifest is written last, so a save interrupted during those
renames leaves a directory that :func:`load` rejects with a clear error instead of one whose
plan and weights silently disagree. The manifest's checksums also
catch truncated or corrupted files. The directory may hold other files (training
checkpoints, for example); they are left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gkpd.files import (
    atomic_write_json,
    existing_dir,
    file_sha256,
    text_writer,
    write_beside,
)
from gkpd.models.cards import CARD_FILE, WEIGHTS_FILE, read_card
from gkpd.plan.schema import CompressionPlan
from gkpd.state_dicts import check_state_dict_matches

__all__ = [
    "CARD_FILE",
    "MANIFEST_FILE",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "is_saved_model",
    "load",
    "read_card",
    "save",
]

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
FORMAT = "gkpd-compressed-model"
FORMAT_VERSION = 1


def is_saved_model(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save` (it has a plan file)."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST_FILE).is_file() or (path / PLAN_FILE).is_file())


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors; tensors sharing storage are copied apart
    (safetensors refuses shared storage)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        elif tensor.numel():
            seen.add(storage)
        tensors[key] = tensor
    return tensors


def _check_model_matches_plan(model: nn.Module, plan: CompressionPlan) -> None:
    """Raise when ``model`` is not the result of applying ``plan`` (the save would not load)."""
    modules = dict(model.named_modules())
    for entry in plan.compressed_layers:
        module = modules.get(entry.name)
        if module is None:
            raise ValueError(f"plan layer {entry.name!r} is not a module of the model")
        # the settings a built layer keeps as attributes of the same name (GKPD's a_shape;
        # the rank of gkpd, svd, cp, tensor_train, tensor_ring) must be the plan's; a
        # Kronecker layer inside a replacement (gkpd_tucker's core) keeps them itself
        planned_a, planned_rank = entry.settings.get("a_shape"), entry.settings.get("rank")
        if planned_a is not None:
            module = next((m for m in module.modules() if hasattr(m, "a_shape")), module)
        a_shape = getattr(module, "a_shape", None)
        if planned_a is not None and a_shape is None:
            raise ValueError(
                f"model layer {entry.name!r} is a dense {type(module).__name__}, but the plan "
                f"compresses it with {entry.method}: apply the plan (gkpd.apply_) before saving"
            )
        if planned_a is not None and tuple(a_shape) != tuple(planned_a):
            raise ValueError(
                f"model layer {entry.name!r} has a_shape {tuple(a_shape)}, the plan says "
                f"{tuple(planned_a)}"
            )
        rank = getattr(module, "rank", None)
        if planned_rank is not None and rank is not None and rank != planned_rank:
            raise ValueError(
                f"model layer {entry.name!r} has rank {rank}, the plan says {planned_rank}"
            )


def save(
    path: str | Path,
    model: nn.Module,
    plan: CompressionPlan,
    *,
    card: dict[str, Any] | None = None,
) -> Path:
    """Write the compressed ``model`` and its ``plan`` to the directory ``path``.

    ``model`` is the model after :func:`gkpd.apply_` (and fine-tuning); ``card`` is optional
    JSON-able metadata that names the dense ``architecture`` (a :func:`gkpd.models.create`
    name) and its ``model_kwargs``. An earlier save in the same directory is replaced; other
    files in the directory are left alone. Returns the directory.
    """
    if not isinstance(plan, CompressionPlan):
        raise TypeError(f"plan must be a CompressionPlan, got {type(plan).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    card_text = None
    if card is not None:
        if not isinstance(card, dict) or "architecture" not in card:
            raise ValueError(
                "card must be a dict that names the 'architecture' (a gkpd.models name), "
                f"got {card!r:.200}"
            )
        try:
            card_text = json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as error:
            raise ValueError(f"card is not JSON-serializable: {error}") from error
    _check_model_matches_plan(model, plan)

    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"save path {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    tensors = _state_tensors(model)
    writers = {PLAN_FILE: text_writer(plan.to_json() + "\n")}
    if card_text is not None:
        writers[CARD_FILE] = text_writer(card_text)
    writers[WEIGHTS_FILE] = lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT})
    manifest_path = path / MANIFEST_FILE
    staged: dict[str, Path] = {}
    try:
        # every file written beside its place first: an earlier save stays whole and loadable
        # until all of them are
        for name, write in writers.items():
            staged[name] = write_beside(path / name, write)
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "files": {name: {"bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
                      for name, tmp in staged.items()},
        }
        # then renamed into place: from here until the new manifest is written, load()
        # refuses the directory instead of pairing one save's plan with another's weights
        manifest_path.unlink(missing_ok=True)
        for name, tmp in staged.items():
            os.replace(tmp, path / name)
        if card_text is None:
            (path / CARD_FILE).unlink(missing_ok=True)  # a stale card would describe another model
        atomic_write_json(manifest_path, manifest, indent=2, sort_keys=True)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)  # those not renamed
    log.info("saved %s (%d tensors, plan of %d layers)", path, len(tensors), len(plan.layers))
    return path


def _warn_of_casts(model: nn.Module, state: dict[str, Tensor], weights_path: Path) -> None:
    """Warn where ``load_state_dict`` would cast a saved floating tensor to the model's dtype
    (a float64 save loaded into a float32 model loses precision without a word)."""
    own = model.state_dict()
    casts = sorted({(str(t.dtype), str(own[k].dtype)) for k, t in state.items()
                    if k in own and t.is_floating_point() and t.dtype != own[k].dtype})
    if casts:
        pairs = ", ".join(f"{saved} as {into}" for saved, into in casts)
        warnings.warn(
            f"{weights_path} holds weights of another dtype than the model's: loaded {pairs}. "
            "Convert the model first (model.to(dtype)) to keep them as saved",
            stacklevel=3,
        )


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(
            f"{path} is not a complete gkpd save: {MANIFEST_FILE} is missing (the save was "
            "interrupted, or the directory was not written by gkpd.save)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path} is corrupt or truncated: {error}") from error
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("files"), dict)
    ):
        raise ValueError(f"{manifest_path} is not a gkpd save manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path} has format version {manifest.get('version')!r}; this gkpd reads "
            f"version {FORMAT_VERSION}"
        )
    for required in (PLAN_FILE, WEIGHTS_FILE):
        if required not in manifest["files"]:
            raise ValueError(f"{manifest_path} does not list {required}")
    return manifest


def _verify(path: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest["files"].items():
        if name not in (PLAN_FILE, WEIGHTS_FILE, CARD_FILE) or not isinstance(expected, dict):
            raise ValueError(f"{path / MANIFEST_FILE} lists an unexpected entry {name!r}")
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file} is missing (listed in {MANIFEST_FILE})")
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise ValueError(
                f"{file} is truncated or was changed: {size} bytes, the manifest says "
                f"{expected.get('bytes')}"
            )
        if file_sha256(file) != expected.get("sha256"):
            raise ValueError(f"{file} is corrupt or was changed: its SHA-256 does not match")


def _check_plan_fits(model: nn.Module, plan: CompressionPlan, source: str) -> None:
    """The plan against the dense ``model`` (layer names, types and weight shapes, and the
    whole-model parameter count), before anything in it is changed."""
    from gkpd.apply import check_plan_fits

    own_params = sum(p.numel() for p in model.parameters())
    try:
        check_plan_fits(model, plan)
    except ValueError as error:
        raise ValueError(f"{source} was made for another architecture: {error}") from error
    if own_params != plan.dense_params:
        raise ValueError(
            f"{source} was made for another architecture: this {type(model).__name__} has "
            f"{own_params:,} parameters, the plan's dense {plan.model_type} "
            f"{plan.dense_params:,}"
        )


def load(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a save of :func:`save` into ``model``, the dense architecture it was made from.

    The plan's Kronecker modules are built in place (``gkpd.apply_(model, plan,
    decompose=False)``, no decomposition) and the saved weights loaded with a strict key and
    shape check. Returns ``model``, in eval mode. A missing, truncated or corrupt file, or a
    plan for another architecture, raises ``ValueError`` naming the file; the plan is checked
    against the model before the model is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    inside = path.name in (PLAN_FILE, WEIGHTS_FILE, MANIFEST_FILE)
    existing_dir(path, "saved model directory", "gkpd.load reads the directory that gkpd.save "
                 "wrote" + (f" ({path.parent})" if inside else ""))
    manifest = _read_manifest(path)
    _verify(path, manifest)
    plan_path = path / PLAN_FILE
    plan = CompressionPlan.load(plan_path)
    _check_plan_fits(model, plan, str(plan_path))

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path = path / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is corrupt or truncated: {error}") from error

    from gkpd.apply import apply_

    try:
        apply_(model, plan, decompose=False)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{plan_path} cannot be applied: {error}") from error
    check_state_dict_matches(model, state, str(weights_path))
    _warn_of_casts(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    log.info(
        "loaded %s: %d compressed layers, %.2fx fewer parameters",
        path,
        len(plan.compressed_layers),
        plan.achieved_ratio if plan.params else math.nan,
    )
    return model.eval()
