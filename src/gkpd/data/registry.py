"""Named data sets: their shape, normalization, and how to build each split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from gkpd.data.transforms import Compose, Normalize, RandomCrop, RandomHorizontalFlip


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    # (split, data_dir, transform, augment) -> Dataset; augment also governs random crops or
    # clip sampling that a loader does while decoding
    build: Callable[[str, str | Path | None, Callable | None, bool], Dataset]
    frames: int | None = None  # a video data set's frames per clip: items (C, T, H, W)

    @property
    def input_size(self) -> list[int]:
        """One item's shape: ``[C, H, W]``, or ``[C, T, H, W]`` for clips."""
        spatial = [self.image_size, self.image_size]
        return [self.in_channels, *([self.frames] if self.frames else []), *spatial]


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    _DATASETS[info.name] = info
    return info


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def get_info(name: str) -> DatasetInfo:
    try:
        return _DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {', '.join(dataset_names())}"
        ) from None


def transform_for(info: DatasetInfo, augment: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    normalize = Normalize(info.mean, info.std)
    if not augment:
        return normalize
    return Compose(RandomCrop(info.crop_padding), RandomHorizontalFlip(), normalize)


def build_dataset(
    name: str, split: str, data_dir: str | Path | None = None, *, augment: bool | None = None
) -> Dataset:
    """The ``train`` or ``test`` split of a named data set; train augments by default."""
    info = get_info(name)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if augment is None:
        augment = split == "train"
    return info.build(split, data_dir, transform_for(info, augment), augment)


def sample_inputs(
    name: str, count: int, data_dir: str | Path | None = None, *, split: str = "train",
    seed: int = 0,
) -> Tensor:
    """``count`` inputs of a named data set's ``split``, drawn without replacement with
    ``seed`` and not augmented, stacked into one tensor: calibration data for
    ``gkpd.plan(..., calibration=...)``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    dataset = build_dataset(name, split, data_dir, augment=False)
    if count > len(dataset):
        raise ValueError(f"count {count} is more than the {len(dataset)} samples of {name} "
                         f"{split}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return torch.stack([dataset[int(i)][0] for i in order[:count]])


def build_loaders(
    name: str,
    data_dir: str | Path | None = None,
    *,
    batch_size: int = 128,
    eval_batch_size: int = 512,
    num_workers: int = 0,
    augment: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """Shuffled, augmented train loader and ordered test loader of a named data set."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    train = build_dataset(name, "train", data_dir, augment=augment)
    test = build_dataset(name, "test", data_dir, augment=False)
    train_loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True
    )
    test_loader = DataLoader(test, batch_size=eval_batch_size, num_workers=num_workers)
    return train_loader, test_loader
