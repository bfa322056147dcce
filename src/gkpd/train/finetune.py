"""The fine-tuning step shared by ``gkpd finetune`` and ``gkpd bench accuracy``.

A fresh random draw of ``train_subset`` training images per epoch (all of them by default),
then :func:`gkpd.train.fit` with distillation from the teacher (when one is given).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from gkpd.train.features import same_name_pairs
from gkpd.train.loop import fit_with
from gkpd.train.options import FitConfig, FitRun

# the defaults of `gkpd finetune` and `gkpd bench accuracy`
FINETUNE_DEFAULTS: dict[str, Any] = {
    "lr": 0.01,
    "weight_decay": 5e-4,
    "alpha": 0.9,
    "temperature": 4.0,
    "batch_size": 128,
}


def finetune_loader(
    dataset: str,
    data_dir: str | Path | None,
    *,
    batch_size: int,
    train_subset: int | None = None,
    workers: int = 0,
) -> DataLoader:
    """Augmented training loader drawing ``train_subset`` random samples per epoch."""
    from gkpd import data

    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset < 1
    ):
        raise ValueError(f"train_subset must be a positive int or None, got {train_subset!r}")
    train = data.build_dataset(dataset, "train", data_dir, augment=True)
    if train_subset is not None and train_subset > len(train):
        raise ValueError(f"train_subset {train_subset} is more than the {len(train):,} training "
                         f"samples of {dataset}")
    samples = len(train) if train_subset is None else train_subset
    if samples < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {samples} training samples per epoch; "
            "lower the batch size or raise the train subset"
        )
    # a fresh random draw of `samples` images every epoch (all of them, shuffled, by default)
    return DataLoader(train, batch_size=batch_size, sampler=EpochDraw(train, samples),
                      drop_last=True, num_workers=workers)


class EpochDraw(RandomSampler):
    """A fresh random draw of ``samples`` items every epoch: the draws of a ``RandomSampler``
    of that many. ``samples`` may change between epochs (from
    :class:`gkpd.train.options.FitRun`'s ``after_epoch``), and ``stop``, called with the
    number of items drawn so far before each next one, may end the draw, and so the epoch,
    early: the main job keeps to its time budget with both. ``drawn``: the items the last
    epoch drew."""

    def __init__(self, data_source, samples: int) -> None:
        self.samples = samples
        self.stop: Callable[[int], bool] | None = None
        self.drawn = 0
        super().__init__(data_source)

    @property
    def num_samples(self) -> int:
        return self.samples

    def __iter__(self) -> Iterator[int]:
        self.drawn = 0
        for index in super().__iter__():
            if self.stop is not None and self.stop(self.drawn):
                return
            self.drawn += 1
            yield index


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader: DataLoader,
    *,
    epochs: int,
    checkpoint_dir: str | Path | None,
    resume: bool,
    eval_loader: DataLoader | None = None,
    device: Any = None,
    progress: bool = True,
    lr: float = FINETUNE_DEFAULTS["lr"],
    weight_decay: float = FINETUNE_DEFAULTS["weight_decay"],
    alpha: float = FINETUNE_DEFAULTS["alpha"],
    temperature: float = FINETUNE_DEFAULTS["temperature"],
    seed: int = 0,
    after_epoch: Callable[[dict[str, Any]], None] | None = None,
    feature_layers: Any = None,
    feature_weight: float = 1.0,
) -> list[dict[str, Any]]:
    """:func:`gkpd.train.fit` of ``student`` with distillation from ``teacher`` (cross-entropy
    alone when ``teacher`` is None); checkpoints every epoch in ``checkpoint_dir``;
    ``after_epoch`` as in :class:`gkpd.train.options.FitRun`. ``feature_layers`` (module
    types, names or ``"re:"`` regexes, e.g. ``"re:layer\\d\\.\\d+"`` for every residual
    block) adds ``feature_weight`` times the mean squared error between those modules'
    outputs in student and teacher (:func:`gkpd.train.features.same_name_pairs`)."""
    pairs = {}
    if feature_layers is not None:
        if teacher is None:
            raise ValueError("feature_layers compare the student with a teacher: pass teacher=")
        pairs = same_name_pairs(student, teacher, feature_layers)
    config = FitConfig(epochs=epochs, lr=lr, weight_decay=weight_decay, alpha=alpha,
                       temperature=temperature, seed=seed, feature_pairs=pairs,
                       feature_weight=feature_weight)
    run = FitRun(teacher=teacher, eval_loader=eval_loader, checkpoint_dir=checkpoint_dir,
                 resume=resume, device=device, progress=progress, after_epoch=after_epoch)
    return fit_with(student, train_loader, config, run)
