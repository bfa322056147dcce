"""``fit`` and ``evaluate`` for any ``nn.Module``: nothing here knows about Kronecker layers."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from gkpd.files import atomic_write_text
from gkpd.train import distributed
from gkpd.train.checkpoint import load_state, save_state
from gkpd.train.losses import distillation_loss

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class FitConfig:
    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for "step"
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    alpha: float = 0.9  # weight of the distillation term when a teacher is given
    temperature: float = 4.0
    feature_weight: float = 1.0
    feature_pairs: dict[str, str] = field(default_factory=dict)
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(
                f"schedule must be 'cosine', 'step' or 'constant', got {self.schedule!r}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        warmup = int(self.warmup_epochs * steps_per_epoch)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        if self.schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(progress >= m for m in self.milestones)
        return self.lr


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
    """
    unknown = set(options) - {f for f in FitConfig.__dataclass_fields__ if f != "epochs"}
    if unknown:
        raise TypeError(f"fit() got unknown options {sorted(unknown)}")
    config = FitConfig(epochs=epochs, **options)
    config.validate()
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    device = torch.device(device) if device is not None else _default_device()
    is_distributed = distributed.ensure_process_group(device)
    if is_distributed and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    metrics_path = Path(checkpoint_dir) / METRICS_NAME if checkpoint_dir else None

    _seed_everything(config.seed)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)
    optimizer = torch.optim.SGD(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
    )

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and checkpoint_path is not None and checkpoint_path.exists():
        state = load_state(checkpoint_path)
        from gkpd.state_dicts import check_state_dict_matches

        check_state_dict_matches(model, state["model"], str(checkpoint_path))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_epoch = int(state["epoch"])
        _set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch)

    loader = (
        distributed.distributed_loader(train_loader, config.seed)
        if is_distributed
        else train_loader
    )
    net: nn.Module = DistributedDataParallel(model) if is_distributed else model
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError("train_loader yields no batches (data set smaller than one batch?)")
    total_steps = config.epochs * steps_per_epoch
    main = distributed.is_main_process()

    student_taps = teacher_taps = None
    if teacher is not None and config.feature_pairs:
        student_taps = _FeatureTaps(model, config.feature_pairs.keys(), "student")
        teacher_taps = _FeatureTaps(teacher, config.feature_pairs.values(), "teacher")

    try:
        for epoch in range(start_epoch, config.epochs):
            if is_distributed:
                loader.sampler.set_epoch(epoch)
            net.train()
            started = time.perf_counter()
            loss_sum = correct = seen = 0.0
            for i, (inputs, targets) in enumerate(
                _batches(loader, progress and main, f"epoch {epoch + 1}/{config.epochs}")
            ):
                step = epoch * steps_per_epoch + i
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(step, total_steps, steps_per_epoch)
                inputs, targets = inputs.to(device), targets.to(device)
                logits = net(inputs)
                if teacher is None:
                    loss = F.cross_entropy(logits, targets, label_smoothing=config.label_smoothing)
                else:
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
                    if student_taps is not None:
                        for s_name, t_name in config.feature_pairs.items():
                            s_out, t_out = (
                                student_taps.outputs[s_name],
                                teacher_taps.outputs[t_name],
                            )
                            if s_out.shape != t_out.shape:
                                raise ValueError(
                                    f"feature_pairs {s_name!r} -> {t_name!r}: shapes "
                                    f"{tuple(s_out.shape)} and {tuple(t_out.shape)} differ"
                                )
                            loss = loss + config.feature_weight * F.mse_loss(s_out, t_out)
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
            loss_sum, correct, seen = distributed.reduce_sums([loss_sum, correct, seen], device)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / seen,
                "train_accuracy": 100.0 * correct / seen,
                "seconds": time.perf_counter() - started,
            }
            if eval_loader is not None:
                result = evaluate(model, eval_loader, device=device, progress=False)
                record["eval_loss"] = result["loss"]
                record["eval_accuracy"] = result["accuracy"]
            history.append(record)
            log.info("epoch %s", json.dumps(record))
            if main and checkpoint_path is not None:
                save_state(
                    checkpoint_path,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "rng": _rng_state(),
                        "history": history,
                        "config": {
                            k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in asdict(config).items()
                        },
                    },
                )
                atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
            distributed.barrier()
    finally:
        for taps in (student_taps, teacher_taps):
            if taps is not None:
                taps.remove()
    return history


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
