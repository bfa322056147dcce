"""``fit`` for any ``nn.Module``: nothing here knows about Kronecker layers.

A classifier trains on ``(inputs, targets)`` batches with cross-entropy, or with a teacher the
distillation loss; any other model with a ``loss_fn`` (:mod:`gkpd.train.objectives`) on the
batches of :mod:`gkpd.train.batches`. ``evaluate`` lives in :mod:`gkpd.train.evaluation`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from gkpd.files import atomic_write_text
from gkpd.state_dicts import check_state_dict_matches
from gkpd.train import distributed
from gkpd.train.batches import (
    batch_size,
    call_model,
    class_scores,
    progress_bar,
    split_batch,
    to_device,
)
from gkpd.train.checkpoint import check_settings, load_state, save_state
from gkpd.train.evaluation import check_metrics, evaluate, scalar
from gkpd.train.features import FeaturePairs
from gkpd.train.losses import distillation_loss
from gkpd.train.objectives import LossFn, attention_mask
from gkpd.train.options import FitConfig, FitRun

__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "FitConfig", "evaluate", "fit", "fit_with"]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    *,
    epochs: int,
    teacher: nn.Module | None = None,
    eval_loader: DataLoader | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    loss_fn: LossFn | None = None,
    metrics: Mapping[str, LossFn] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` in place (SGD, or AdamW with ``optimizer="adamw"``); returns one
    metrics dict per epoch. ``train_loader`` is a ``DataLoader`` or, on one process, a list
    (any sized iterable) of batches.

    ``options`` are the fields of :class:`FitConfig` (lr, weight_decay, schedule, alpha, ...).
    Batches are those of :mod:`gkpd.train.batches`: ``(inputs, targets)``, a dict of keyword
    inputs, or a tensor. Without ``loss_fn`` the model is a classifier: cross-entropy on the
    targets, or with ``teacher`` the distillation loss of :func:`distillation_loss` (with
    ``alpha=1`` the teacher's outputs alone: batches need no targets), and the epoch records
    its accuracy where they have targets. With ``loss_fn(output, teacher_output, batch)``
    (:data:`gkpd.train.objectives.LossFn`, e.g. :func:`gkpd.train.hidden_state_loss`) that is
    the loss, and no accuracy is recorded. With a teacher, ``feature_weight`` times the
    ``feature_loss`` between the outputs of the modules named in ``feature_pairs`` (student
    name -> teacher name) is added. ``eval_loader`` is scored by :func:`evaluate` with the same
    teacher, ``loss_fn`` and ``metrics``. With ``checkpoint_dir``, the state is written
    atomically after every epoch and ``resume=True`` continues from it, ending with the same
    weights as an unbroken run (with no checkpoint there yet, it trains from the start, as a
    run stopped before its first epoch ended must); ``loss_fn`` and ``metrics`` are code, not
    saved state: pass the same ones again. Under ``torchrun`` the model is wrapped in
    DistributedDataParallel, each rank reads its own shard, and rank 0 writes the files.
    :func:`fit_with` is the same with the settings grouped.
    """
    unknown = set(options) - {f for f in FitConfig.__dataclass_fields__ if f != "epochs"}
    if unknown:
        raise TypeError(f"fit() got unknown options {sorted(unknown)}")
    run = FitRun(teacher=teacher, eval_loader=eval_loader, checkpoint_dir=checkpoint_dir,
                 resume=resume, device=device, progress=progress, loss_fn=loss_fn,
                 metrics=metrics)
    return fit_with(model, train_loader, FitConfig(epochs=epochs, **options), run)


def fit_with(
    model: nn.Module, train_loader: DataLoader, config: FitConfig, run: FitRun
) -> list[dict[str, Any]]:
    """:func:`fit` with its settings as a :class:`FitConfig` and a :class:`FitRun`."""
    config.validate()
    if not isinstance(run.resume, bool):
        raise TypeError(f"resume must be a bool, got {run.resume!r}")
    if run.resume and run.checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if config.feature_pairs and run.teacher is None:
        raise ValueError("feature_pairs compare with a teacher's modules: pass teacher=")
    if run.loss_fn is not None and not callable(run.loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(run.loss_fn).__name__}")
    check_metrics(run.metrics)
    session = _set_up(model, train_loader, config, run)
    try:
        for epoch in range(session.start_epoch, config.epochs):
            record = _train_epoch(session, epoch)
            _end_epoch(session, epoch, record)
    finally:
        if session.features is not None:
            session.features.remove()
    return session.history


@dataclass
class _Session:
    """What the steps of :func:`fit_with` share: set up once, then updated epoch by epoch."""

    model: nn.Module
    net: nn.Module  # the model, or its DistributedDataParallel wrapper
    loader: Any
    optimizer: torch.optim.Optimizer
    device: torch.device
    config: FitConfig
    run: FitRun
    is_distributed: bool
    main: bool
    checkpoint_path: Path | None
    metrics_path: Path | None
    history: list[dict[str, Any]]
    start_epoch: int
    settings: dict[str, Any]  # what the checkpoint records and a resumed run must repeat
    features: FeaturePairs | None = None


def _optimizer(model: nn.Module, config: FitConfig) -> torch.optim.Optimizer:
    """SGD or AdamW with weight decay on the weights, none on biases and norms (parameters of
    <= 1 dim)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(
        # Nesterov's look-ahead needs a momentum: without one it is plain SGD, which torch
        # refuses to be asked for by that name
        groups, lr=config.lr, momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
    )


def _set_up(
    model: nn.Module, train_loader: DataLoader, config: FitConfig, run: FitRun
) -> _Session:
    """Device, process group, seeds, teacher, optimizer; the checkpoint's state when resuming;
    the (sharded) loader and the feature taps."""
    device = torch.device(run.device) if run.device is not None else _default_device()
    is_distributed = distributed.ensure_process_group(device)
    if is_distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    checkpoint_dir = run.checkpoint_dir
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    metrics_path = Path(checkpoint_dir) / METRICS_NAME if checkpoint_dir else None

    _check_loader(train_loader, is_distributed)
    _check_eval_loader(run.eval_loader)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter: every one has "
                         "requires_grad=False")
    _check_dtypes(model, run.teacher)
    _seed_everything(config.seed)
    model.to(device)
    teacher = run.teacher
    if teacher is not None:  # its forward runs under no_grad: its parameters stay as they are
        teacher.to(device).eval()
    optimizer = _optimizer(model, config)

    settings = _run_settings(config, train_loader, teacher)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if run.resume and checkpoint_path is not None:
        if checkpoint_path.exists():
            history, start_epoch = _resume(model, optimizer, checkpoint_path, settings)
        else:  # a run restarted after it was stopped before its first epoch ended
            log.info("no checkpoint at %s to resume from: training from the start",
                     checkpoint_path)

    loader = (
        distributed.distributed_loader(train_loader, config.seed)
        if is_distributed
        else train_loader
    )
    net: nn.Module = DistributedDataParallel(model) if is_distributed else model
    session = _Session(
        model=model, net=net, loader=loader, optimizer=optimizer, device=device,
        config=config, run=run, is_distributed=is_distributed, main=False,
        checkpoint_path=checkpoint_path, metrics_path=metrics_path, history=history,
        start_epoch=start_epoch, settings=settings,
    )
    if len(loader) == 0:
        raise ValueError("train_loader yields no batches (data set smaller than one batch?)")
    session.main = distributed.is_main_process()

    if teacher is not None and config.feature_pairs:
        session.features = FeaturePairs(model, teacher, config.feature_pairs,
                                        config.feature_loss)
    return session


def _check_dtypes(model: nn.Module, teacher: nn.Module | None) -> None:
    """A student and teacher of other floating dtypes fail in the first loss, deep in torch."""
    dtypes = [next((p.dtype for p in m.parameters() if p.is_floating_point()), None)
              for m in (model, teacher) if m is not None]
    if len(dtypes) == 2 and None not in dtypes and dtypes[0] != dtypes[1]:
        raise ValueError(f"the model is {dtypes[0]} and the teacher {dtypes[1]}: convert one "
                         f"(teacher.to({dtypes[0]}))")


def _yields_batches(loader: Any) -> bool:
    """Whether iterating ``loader`` can give batches: not a string, mapping or tensor, whose
    items are characters, keys or rows."""
    return isinstance(loader, Iterable) and not isinstance(
        loader, str | bytes | Mapping | torch.Tensor)


def _check_loader(loader: Any, is_distributed: bool) -> None:
    """A ``DataLoader``, or (on one process) a sized iterable of batches such as a list: its
    length sets the learning-rate schedule."""
    if isinstance(loader, DataLoader):
        return
    kind = type(loader).__name__
    if is_distributed:
        raise TypeError("under torchrun train_loader must be a torch DataLoader (each rank "
                        f"draws its share through the loader's sampler), got {kind}")
    if not (_yields_batches(loader) and hasattr(loader, "__len__")):
        raise TypeError("train_loader must be a DataLoader or a sized iterable of batches (a "
                        f"list: its length sets the learning-rate schedule), got {kind}")


def _check_eval_loader(loader: Any) -> None:
    """``eval_loader`` is scored after each epoch: a wrong kind is refused before the first."""
    if loader is not None and not _yields_batches(loader):
        raise TypeError("eval_loader must be a DataLoader or an iterable of batches, got "
                        f"{type(loader).__name__}")


def _run_settings(
    config: FitConfig, loader: Iterable, teacher: nn.Module | None
) -> dict[str, Any]:
    """The settings that make a run what it is: the :class:`FitConfig`, the batch size and
    training samples per epoch, whether a teacher distils and which (JSON-like values)."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    settings["batch_size"] = getattr(loader, "batch_size", None)  # None: a list of batches
    sampler = getattr(loader, "sampler", None)
    settings["samples_per_epoch"] = len(sampler) if hasattr(sampler, "__len__") else None
    settings["distillation"] = teacher is not None
    if teacher is not None:
        settings["teacher"] = weights_fingerprint(teacher)
    return settings


def weights_fingerprint(model: nn.Module) -> str:
    """A digest of ``model``'s parameters and buffers (names, dtypes, shapes, values): two
    teachers with other weights differ (a resumed run must distil from the same one)."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _resume(
    model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint_path: Path,
    settings: dict[str, Any],
) -> tuple[list[dict[str, Any]], int]:
    """Load the checkpoint's weights, optimizer and RNG state; its history and epoch. A
    checkpoint recorded with other ``settings`` is refused (:class:`ResumeMismatch`): the
    resumed run would silently be another run."""
    state = load_state(checkpoint_path)
    check_settings(state, settings, checkpoint_path)
    check_state_dict_matches(model, state["model"], str(checkpoint_path))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    history = list(state["history"])
    start_epoch = int(state["epoch"])
    _set_rng_state(state["rng"])
    log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)
    return history, start_epoch


def _loss(s: _Session, batch: Any, inputs: Any, output: Any,
          targets: torch.Tensor | None) -> torch.Tensor:
    """The user's ``loss_fn``, or cross-entropy (with a teacher the distillation loss); plus
    the feature terms."""
    config, teacher = s.config, s.run.teacher
    teacher_output = None
    if teacher is not None:
        with torch.no_grad():
            teacher_output = call_model(teacher, inputs)
    if s.run.loss_fn is not None:
        loss = scalar(s.run.loss_fn(output, teacher_output, batch), "loss_fn")
    elif targets is None and (teacher is None or config.alpha < 1.0):
        raise ValueError(
            "the batch has no targets: yield (inputs, targets) batches to train a classifier, "
            "distil from a teacher alone (alpha=1), or pass loss_fn= (see "
            "gkpd.train.objectives)"
        )
    elif teacher is None:
        loss = F.cross_entropy(class_scores(output), targets,
                               label_smoothing=config.label_smoothing)
    else:
        loss = distillation_loss(
            class_scores(output),
            class_scores(teacher_output),
            targets,
            alpha=config.alpha,
            temperature=config.temperature,
            label_smoothing=config.label_smoothing,
        )
    if s.features is not None:
        loss = loss + config.feature_weight * s.features.distance(attention_mask(batch))
    return loss


def _train_epoch(s: _Session, epoch: int) -> dict[str, Any]:
    """One pass over the training data; the epoch's record (loss, accuracy for a classifier,
    lr, seconds)."""
    config, optimizer = s.config, s.optimizer
    classifier = s.run.loss_fn is None
    # the loader's length is read every epoch: FitRun.after_epoch may resize the next draw,
    # and the schedule then follows the fraction of training done
    steps_per_epoch = len(s.loader)
    total_steps = config.epochs * steps_per_epoch
    if s.is_distributed:
        s.loader.sampler.set_epoch(epoch)
    s.net.train()
    started = time.perf_counter()
    loss_sum = correct = seen = 0.0
    description = f"epoch {epoch + 1}/{config.epochs}"
    for i, batch in enumerate(progress_bar(s.loader, s.run.progress and s.main, description)):
        step = epoch * steps_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step, total_steps, steps_per_epoch)
        batch = to_device(batch, s.device)
        inputs, targets = split_batch(batch)
        output = call_model(s.net, inputs)
        loss = _loss(s, batch, inputs, output, targets)
        if not torch.isfinite(loss):  # before the step: the weights stay as they were
            raise FloatingPointError(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {i}; lower lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        count = batch_size(inputs)
        loss_sum += loss.item() * count
        if classifier and targets is not None:
            correct += (class_scores(output).argmax(1) == targets).sum().item()
        else:  # unlabelled batches (distilled with alpha=1): no accuracy to report
            classifier = False
        seen += count
    loss_sum, correct, seen = distributed.reduce_sums([loss_sum, correct, seen], s.device)
    if seen == 0:
        raise ValueError(f"epoch {epoch + 1} trained on no batch: the loader yielded none")
    record = {
        "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / seen,
    }
    if classifier:
        record["train_accuracy"] = 100.0 * correct / seen
    record["seconds"] = time.perf_counter() - started
    return record


def _write_checkpoint(s: _Session, epoch: int) -> None:
    """The checkpoint after ``epoch`` and the metrics file (rank 0)."""
    save_state(
        s.checkpoint_path,
        {
            "epoch": epoch + 1,
            "model": s.model.state_dict(),
            "optimizer": s.optimizer.state_dict(),
            "rng": _rng_state(),
            "history": s.history,
            "settings": s.settings,
        },
    )
    atomic_write_text(s.metrics_path, "".join(json.dumps(r) + "\n" for r in s.history))


def _end_epoch(s: _Session, epoch: int, record: dict[str, Any]) -> None:
    """Evaluate, record the epoch, and (rank 0) write the checkpoint and the metrics file;
    weights that are no longer finite (the epoch's last steps diverged) end the run with the
    last checkpoint kept."""
    broken = [n for n, p in s.model.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken:
        raise FloatingPointError(
            f"the weights became NaN or infinite during epoch {epoch + 1} ({broken[0]}"
            f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}); lower lr"
        )
    if s.run.eval_loader is not None:
        try:
            result = evaluate(
                s.model, s.run.eval_loader, device=s.device, teacher=s.run.teacher,
                loss_fn=s.run.loss_fn, metrics=s.run.metrics,
            )
        except Exception as error:  # the epoch's training is not lost with its evaluation
            s.history.append(record)
            if s.main and s.checkpoint_path is not None:
                _write_checkpoint(s, epoch)
                error.add_note(f"evaluating epoch {epoch + 1} failed; its training is kept in "
                               f"{s.checkpoint_path}: fix eval_loader and resume")
            raise
        record.update({f"eval_{k}": v for k, v in result.items() if k != "count"})
    s.history.append(record)
    log.info("epoch %s", json.dumps(record))
    if s.main and s.checkpoint_path is not None:
        _write_checkpoint(s, epoch)
    distributed.barrier()
    if s.run.after_epoch is not None:
        s.run.after_epoch(record)
