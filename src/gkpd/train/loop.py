"""``fit`` and ``evaluate`` for any ``nn.Module``: nothing here knows about Kronecker layers."""

from __future__ import annotations

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
from gkpd.train.checkpoint import check_settings, load_state, save_state
from gkpd.train.losses import distillation_loss
from gkpd.train.options import FitConfig, FitRun

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


class _FeatureTaps:
    """Records the outputs of named modules during a forward pass."""

    def __init__(self, model: nn.Module, names: Iterable[str], role: str) -> None:
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            if name not in modules:
                raise ValueError(
                    f"feature_pairs names {role} module {name!r}, which does not exist"
                )
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def record(_module, _inputs, output):
            self.outputs[name] = output

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batches(loader: DataLoader, progress: bool, description: str):
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return loader
        return tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    return loader


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
    **options: Any,
) -> list[dict[str, Any]]:
    """Train ``model`` in place with SGD; returns one metrics dict per epoch.

    ``options`` are the fields of :class:`FitConfig` (lr, weight_decay, schedule, alpha, ...).
    With ``teacher``, the loss is the distillation loss of :func:`distillation_loss`, plus
    ``feature_weight`` times the MSE between the outputs of the modules named in
    ``feature_pairs`` (student name -> teacher name). With ``checkpoint_dir``, the state is
    written atomically after every epoch and ``resume=True`` continues from it, ending with
    the same weights as an unbroken run. Under ``torchrun`` the model is wrapped in
    DistributedDataParallel, each rank reads its own shard, and rank 0 writes the files.
    :func:`fit_with` is the same with the settings grouped.
    """
    unknown = set(options) - {f for f in FitConfig.__dataclass_fields__ if f != "epochs"}
    if unknown:
        raise TypeError(f"fit() got unknown options {sorted(unknown)}")
    run = FitRun(teacher=teacher, eval_loader=eval_loader, checkpoint_dir=checkpoint_dir,
                 resume=resume, device=device, progress=progress)
    return fit_with(model, train_loader, FitConfig(epochs=epochs, **options), run)


def fit_with(
    model: nn.Module, train_loader: DataLoader, config: FitConfig, run: FitRun
) -> list[dict[str, Any]]:
    """:func:`fit` with its settings as a :class:`FitConfig` and a :class:`FitRun`."""
    config.validate()
    if run.resume and run.checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    session = _set_up(model, train_loader, config, run)
    try:
        for epoch in range(session.start_epoch, config.epochs):
            record = _train_epoch(session, epoch)
            _end_epoch(session, epoch, record)
    finally:
        for taps in (session.student_taps, session.teacher_taps):
            if taps is not None:
                taps.remove()
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
    student_taps: _FeatureTaps | None = None
    teacher_taps: _FeatureTaps | None = None


def _optimizer(model: nn.Module, config: FitConfig) -> torch.optim.Optimizer:
    """SGD with weight decay on the weights, none on biases and norms (parameters of <= 1 dim)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    return torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
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

    _seed_everything(config.seed)
    model.to(device)
    teacher = run.teacher
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = _optimizer(model, config)

    settings = _run_settings(config, train_loader, teacher)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if run.resume and checkpoint_path is not None and checkpoint_path.exists():
        history, start_epoch = _resume(model, optimizer, checkpoint_path, settings)

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
        session.student_taps = _FeatureTaps(model, config.feature_pairs.keys(), "student")
        session.teacher_taps = _FeatureTaps(teacher, config.feature_pairs.values(), "teacher")
    return session


def _run_settings(
    config: FitConfig, loader: DataLoader, teacher: nn.Module | None
) -> dict[str, Any]:
    """The settings that make a run what it is: the :class:`FitConfig`, the batch size and
    training samples per epoch, and whether a teacher distils (JSON-like values)."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    settings["batch_size"] = loader.batch_size
    sampler = loader.sampler
    settings["samples_per_epoch"] = len(sampler) if hasattr(sampler, "__len__") else None
    settings["distillation"] = teacher is not None
    return settings


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


def _loss(s: _Session, inputs: torch.Tensor, logits: torch.Tensor,
          targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, or with a teacher the distillation loss plus the feature terms."""
    config, teacher = s.config, s.run.teacher
    if teacher is None:
        return F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    loss = distillation_loss(
        logits,
        teacher_logits,
        targets,
        alpha=config.alpha,
        temperature=config.temperature,
        label_smoothing=config.label_smoothing,
    )
    if s.student_taps is not None:
        for s_name, t_name in config.feature_pairs.items():
            s_out, t_out = s.student_taps.outputs[s_name], s.teacher_taps.outputs[t_name]
            if s_out.shape != t_out.shape:
                raise ValueError(
                    f"feature_pairs {s_name!r} -> {t_name!r}: shapes "
                    f"{tuple(s_out.shape)} and {tuple(t_out.shape)} differ"
                )
            loss = loss + config.feature_weight * F.mse_loss(s_out, t_out)
    return loss


def _train_epoch(s: _Session, epoch: int) -> dict[str, Any]:
    """One pass over the training data; the epoch's record (loss, accuracy, lr, seconds)."""
    config, optimizer = s.config, s.optimizer
    # the loader's length is read every epoch: FitRun.after_epoch may resize the next draw,
    # and the schedule then follows the fraction of training done
    steps_per_epoch = len(s.loader)
    total_steps = config.epochs * steps_per_epoch
    if s.is_distributed:
        s.loader.sampler.set_epoch(epoch)
    s.net.train()
    started = time.perf_counter()
    loss_sum = correct = seen = 0.0
    for i, (inputs, targets) in enumerate(
        _batches(s.loader, s.run.progress and s.main, f"epoch {epoch + 1}/{config.epochs}")
    ):
        step = epoch * steps_per_epoch + i
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step, total_steps, steps_per_epoch)
        inputs, targets = inputs.to(s.device), targets.to(s.device)
        logits = s.net(inputs)
        loss = _loss(s, inputs, logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at epoch {epoch + 1}, step {i}; lower lr"
            )
        loss_sum += loss.item() * targets.shape[0]
        correct += (logits.argmax(1) == targets).sum().item()
        seen += targets.shape[0]
    loss_sum, correct, seen = distributed.reduce_sums([loss_sum, correct, seen], s.device)
    if seen == 0:
        raise ValueError(f"epoch {epoch + 1} trained on no batch: the loader yielded none")
    return {
        "epoch": epoch + 1,
        "lr": optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / seen,
        "train_accuracy": 100.0 * correct / seen,
        "seconds": time.perf_counter() - started,
    }


def _end_epoch(s: _Session, epoch: int, record: dict[str, Any]) -> None:
    """Evaluate, record the epoch, and (rank 0) write the checkpoint and the metrics file."""
    if s.run.eval_loader is not None:
        result = evaluate(s.model, s.run.eval_loader, device=s.device, progress=False)
        record["eval_loss"] = result["loss"]
        record["eval_accuracy"] = result["accuracy"]
    s.history.append(record)
    log.info("epoch %s", json.dumps(record))
    if s.main and s.checkpoint_path is not None:
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
    distributed.barrier()
    if s.run.after_epoch is not None:
        s.run.after_epoch(record)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean cross-entropy and top-1 accuracy (percent) of ``model`` over ``loader``."""
    device = (
        torch.device(device)
        if device is not None
        else next((p.device for p in model.parameters()), torch.device("cpu"))
    )
    was_training = model.training
    model.eval()
    loss_sum = correct = seen = 0.0
    try:
        for inputs, targets in _batches(loader, progress, "eval"):
            inputs, targets = inputs.to(device), targets.to(device)
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.argmax(1) == targets).sum().item()
            seen += targets.shape[0]
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("loader yields no samples")
    return {"loss": loss_sum / seen, "accuracy": 100.0 * correct / seen, "count": int(seen)}
