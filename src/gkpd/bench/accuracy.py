"""Accuracy benchmark: compress one trained model with several methods at several ratios,
fine-tune each with the same budget and the same distillation from the original, and compare.

Every (method, ratio) cell lives in its own directory under ``out``: ``before.json`` (test
accuracy right after compression), ``finetune/`` (the checkpoint :func:`gkpd.train.fit` writes
every epoch), ``model/`` (the fine-tuned model) and, written last, ``result.json``. A cell whose
``result.json`` says ``ok`` is done and is not run again; a cell without one, or whose last run
failed (a mismatched checkpoint, an interrupted machine), runs again and resumes from its
checkpoint. Delete a cell's directory to run it from the start.

About 400 lines on purpose: the cells' life cycle (build, evaluate, fine-tune, resume,
record) shares the budget checks that keep one directory's cells comparable.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from gkpd.bench.report import require_matplotlib, write_reports
from gkpd.bench.variants import VARIANTS, compress_options
from gkpd.files import atomic_write_text
from gkpd.train.finetune import FINETUNE_DEFAULTS, finetune

log = logging.getLogger(__name__)

STUDENT = "student"
DENSE = "dense"
RESULT_FILE = "result.json"
BEFORE_FILE = "before.json"
BENCH_FILE = "bench.json"


def known_methods() -> list[str]:
    """Compression methods of :mod:`gkpd.methods`, their named variants and the reference
    ``student``."""
    from gkpd.methods import method_names

    return [*method_names(), *VARIANTS, STUDENT]


@dataclass(frozen=True)
class AccuracyConfig:
    """What is compared (methods x ratios) and the fine-tuning budget every cell gets."""

    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    epochs: int
    train_subset: int | None = None
    batch_size: int = FINETUNE_DEFAULTS["batch_size"]
    lr: float = FINETUNE_DEFAULTS["lr"]
    student_lr: float = 0.1  # the student starts from random weights: `gkpd train`'s default
    weight_decay: float = FINETUNE_DEFAULTS["weight_decay"]
    alpha: float = FINETUNE_DEFAULTS["alpha"]
    temperature: float = FINETUNE_DEFAULTS["temperature"]
    seed: int = 0
    latency_threads: int | None = 1
    latency_repeats: int = 20
    # distil these modules' outputs too (gkpd finetune --feature-layers), in every compressed
    # cell alike; not in the student's, whose modules have other widths
    feature_layers: tuple[str, ...] | None = None
    feature_weight: float = 1.0

    def validate(self) -> None:
        if isinstance(self.methods, str) or not self.methods:
            raise ValueError(f"methods must be a non-empty list of names, got {self.methods!r}")
        known = known_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(
                f"unknown method(s) {', '.join(map(repr, unknown))}; "
                f"expected some of {', '.join(known)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a name twice: {list(self.methods)}")
        if isinstance(self.ratios, str) or not self.ratios:
            raise ValueError(f"ratios must be a non-empty list of numbers, got {self.ratios!r}")
        for r in self.ratios:
            if isinstance(r, bool) or not isinstance(r, int | float) or not r > 1:
                raise ValueError(f"ratios must be numbers > 1, got {r!r} in {list(self.ratios)}")
        if len(set(self.ratios)) != len(self.ratios):
            raise ValueError(f"ratios lists a value twice: {list(self.ratios)}")
        for name in ("epochs", "batch_size", "latency_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("train_subset", "latency_threads"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("lr", "student_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def budget(self) -> dict[str, Any]:
        """The settings every cell of one ``out`` directory must share."""
        data = asdict(self)
        for key in ("methods", "ratios", "latency_threads", "latency_repeats"):
            del data[key]
        if self.feature_layers is None:  # as budgets recorded before the option existed
            del data["feature_layers"], data["feature_weight"]
        else:
            data["feature_layers"] = list(self.feature_layers)
        return data

    def cells(self) -> list[tuple[str, float]]:
        return [(m, float(r)) for r in self.ratios for m in self.methods]


def cell_name(method: str, ratio: float) -> str:
    return f"{method}-{ratio:g}x"


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable or not JSON ({error}); delete it") from error


def _check_budget(out: Path, config: AccuracyConfig, context: Mapping[str, Any]) -> None:
    """Refuse to mix cells of different budgets (or models, or data) in one ``out``."""
    path = out / BENCH_FILE
    recorded = {"budget": config.budget(), "context": dict(context)}
    if path.is_file():
        previous = _read_json(path)
        for part in ("budget", "context"):
            old, new = previous.get(part, {}), recorded[part]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                details = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
                raise ValueError(
                    f"out {out} holds a benchmark run with other settings ({details}); "
                    "rerun with the same settings or pick another out directory"
                )
        return
    _write_json(path, recorded)


class _Bench:
    """One run of :func:`run_accuracy`: shared state of its cells."""

    def __init__(self, teacher, example_input, train_loader, test_loader, config, out, *,
                 card, device, progress, calibration):
        self.teacher = teacher
        self.x = example_input
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.config = config
        self.out = out
        self.card = dict(card or {})
        self.device = device
        self.progress = progress
        self.calibration = calibration

    def options(self, method: str) -> tuple[str, dict[str, Any]]:
        """The method a (variant) name runs and its options of ``gkpd.compress``."""
        return compress_options(method, self.calibration)

    def evaluate(self, model: nn.Module) -> float:
        from gkpd.train import evaluate

        model.to(self.device)
        return evaluate(model, self.test_loader, device=self.device)["accuracy"]

    def count(self, model: nn.Module) -> dict[str, Any]:
        from gkpd.counting import count_model

        counts = count_model(model.cpu(), self.x)
        return {"params": counts.total_params, "macs": counts.total_macs}

    def latency(self, model: nn.Module) -> dict[str, Any]:
        from gkpd.timing import measure_latency

        model.to(self.device)
        latency = measure_latency(
            model,
            self.x[:1].to(self.device),
            threads=self.config.latency_threads,
            repeats=self.config.latency_repeats,
        )
        return {
            "latency_ms": latency["median_ms"],
            "latency_threads": latency["threads"],
        }

    def dense(self) -> dict[str, Any]:
        path = self.out / f"{DENSE}.json"
        if path.is_file():
            return _read_json(path)
        log.info("dense model: evaluating")
        result = {"method": DENSE, "ratio": 1.0, "achieved_ratio": 1.0, "status": "ok"}
        result.update(self.count(self.teacher))
        result.update(self.latency(self.teacher))
        result["accuracy_before"] = result["accuracy_after"] = self.evaluate(self.teacher)
        self.teacher.cpu()
        _write_json(path, result)
        return result

    def build(self, method: str, ratio: float, dense_params: int):
        """The cell's model before fine-tuning, its plan (None for the student) and notes."""
        from gkpd.apply import compress

        if method == STUDENT:
            from gkpd.bench.student import build_student

            model, kwargs = build_student(
                self.teacher,
                self.card.get("architecture"),
                self.card.get("model_kwargs", {}),
                dense_params / ratio,
                seed=self.config.seed,
            )
            return model, None, {"model_kwargs": kwargs}
        method, options = self.options(method)
        model, plan = compress(self.teacher, self.x, ratio=ratio, method=method, **options)
        # the default strategy: uniform, or near_uniform where uniform's rank steps miss the ratio
        # (svd, tensor_ring on ResNet-32); the table says so
        notes: dict[str, Any] = {"strategy": plan.strategy}
        if "uniform_error" in plan.options:
            notes["uniform_error"] = plan.options["uniform_error"]
        if "calibration" in plan.options:
            notes["plan_options"] = {"calibration": plan.options["calibration"]}
        for p in model.parameters():  # fit() froze the teacher's, which the copy inherited
            p.requires_grad_(True)
        return model, plan, notes

    def run_cell(self, method: str, ratio: float, dense: dict[str, Any]) -> dict[str, Any]:
        cell = self.out / cell_name(method, ratio)
        result_path = cell / RESULT_FILE
        if result_path.is_file():
            previous = _read_json(result_path)
            if previous.get("status") == "ok":
                log.info("%s: done before, not run again", cell.name)
                return previous
            log.info("%s: failed before (%s); running it again", cell.name,
                     previous.get("error", "no error recorded"))
        result: dict[str, Any] = {"method": method, "ratio": ratio, "dir": cell.name}
        stage = "compress"
        started = time.perf_counter()
        try:
            self.teacher.cpu()
            log.info("%s: building the model", cell.name)
            model, plan, notes = self.build(method, ratio, dense["params"])
            result.update(notes)
            stage = "measure"
            result.update(self.count(model))
            result["achieved_ratio"] = dense["params"] / result["params"]
            before_path = cell / BEFORE_FILE
            if before_path.is_file():
                result["accuracy_before"] = _read_json(before_path)["accuracy"]
            else:
                result["accuracy_before"] = self.evaluate(model)
                _write_json(before_path, {"accuracy": result["accuracy_before"]})
            stage = "finetune"
            log.info(
                "%s: %.2fx, accuracy %.2f%% before fine-tuning; fine-tuning %d epochs",
                cell.name,
                result["achieved_ratio"],
                result["accuracy_before"],
                self.config.epochs,
            )
            c = self.config
            history = finetune(
                model,
                self.teacher,
                self.train_loader,
                epochs=c.epochs,
                checkpoint_dir=cell / "finetune",
                resume=True,
                device=self.device,
                progress=self.progress,
                lr=c.student_lr if method == STUDENT else c.lr,
                weight_decay=c.weight_decay,
                alpha=c.alpha,
                temperature=c.temperature,
                seed=c.seed,
                **({"feature_layers": list(c.feature_layers), "feature_weight": c.feature_weight}
                   if c.feature_layers is not None and method != STUDENT else {}),
            )
            stage = "evaluate"
            result["accuracy_after"] = self.evaluate(model)
            result["finetune_seconds"] = sum(r["seconds"] for r in history)
            result["epochs"] = len(history)
            result["train_samples"] = c.train_subset or len(self.train_loader.dataset)
            result["train_loss"] = history[-1]["train_loss"]
            result.update(self.latency(model))
            self.save_model(cell / "model", model.cpu(), plan, result)
            result["status"] = "ok"
        except Exception as error:  # one cell's failure is recorded; the others go on
            log.warning("%s failed at stage %s: %s", cell.name, stage, error)
            log.debug("%s traceback", cell.name, exc_info=True)
            result.update(status="failed", stage=stage, error=f"{type(error).__name__}: {error}")
        finally:
            self.teacher.cpu()
        result["seconds"] = time.perf_counter() - started
        _write_json(result_path, result)
        return result

    def save_model(self, path: Path, model: nn.Module, plan, result: dict[str, Any]) -> None:
        keys = ("architecture", "model_kwargs", "dataset", "normalization", "input_size")
        card = {k: self.card[k] for k in keys if k in self.card}
        card["test_accuracy"] = result["accuracy_after"]
        card["bench"] = {"method": result["method"], "ratio": result["ratio"]}
        if plan is None:
            from gkpd.models.pretrained import save_trained

            card["model_kwargs"] = result["model_kwargs"]
            save_trained(path, model, card)
        else:
            from gkpd.io import save

            save(path, model, plan, card=card if "architecture" in card else None)


def run_accuracy(
    teacher: nn.Module,
    example_input: torch.Tensor,
    *,
    train_loader: DataLoader,
    test_loader: DataLoader,
    config: AccuracyConfig,
    out: str | Path,
    card: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    reference: Mapping[str, float] | None = None,
    reference_source: str | None = None,
    plot: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    calibration: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run (or resume) every cell of ``config`` and write ``results.md``, ``results.json`` and
    (with ``plot``) ``pareto.png`` in ``out``; returns what ``results.json`` holds.

    ``teacher`` is the trained dense model (also the distillation teacher; it is not changed);
    ``example_input`` a batch of its input (batch 1 is used for latency); ``card`` its model
    card (``architecture`` and ``model_kwargs`` are needed by the ``student`` method);
    ``context`` JSON-able facts that must not change between runs in ``out`` (model, data);
    ``reference`` published accuracies by method name (and ``"dense"``), shown beside ours.
    ``calibration``: inputs for the data-aware variants (``VARIANTS``), e.g. a fixed draw of
    training images.
    """
    if not isinstance(config, AccuracyConfig):
        raise TypeError(f"config must be an AccuracyConfig, got {type(config).__name__}")
    config.validate()
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise TypeError("example_input must be a batched tensor")
    if plot:
        require_matplotlib()
    if STUDENT in config.methods:  # fail before any training when the family has no width knob
        from gkpd.bench.student import check_width_knob

        check_width_knob(teacher, (card or {}).get("architecture"))
    device = torch.device(
        device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_budget(out, config, context or {})
    teacher = copy.deepcopy(teacher).cpu().eval()
    bench = _Bench(teacher, example_input.cpu(), train_loader, test_loader, config, out,
                   card=card, device=device, progress=progress, calibration=calibration)
    dense = bench.dense()
    cells = []
    todo = config.cells()
    for i, (method, ratio) in enumerate(todo, 1):
        log.info("cell %d/%d: %s at %gx", i, len(todo), method, ratio)
        cells.append(bench.run_cell(method, ratio, dense))
    results = {
        "config": asdict(config),
        "context": dict(context or {}),
        "device": str(device),
        "dense": dense,
        "cells": cells,
        "reference": dict(reference) if reference else None,
        "reference_source": reference_source,
    }
    write_reports(out, results, plot=plot)
    return results


def load_results(out: str | Path) -> dict[str, Any]:
    """What :func:`run_accuracy` wrote to ``out/results.json``."""
    return _read_json(Path(out) / "results.json")


__all__: Sequence[str] = [
    "AccuracyConfig",
    "DENSE",
    "STUDENT",
    "cell_name",
    "known_methods",
    "load_results",
    "run_accuracy",
]
