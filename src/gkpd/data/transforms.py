"""Augmentation and normalization on tensors (no torchvision needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


class RandomCrop:
    """Zero-pad by ``padding`` on each side, then crop back to the original size at random."""

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        p = self.padding
        height, width = image.shape[-2:]
        padded = F.pad(image, (p, p, p, p))
        top = int(torch.randint(0, 2 * p + 1, ()))
        left = int(torch.randint(0, 2 * p + 1, ()))
        return padded[..., top : top + height, left : left + width]


class RandomHorizontalFlip:
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) < 0.5:
            return image.flip(-1)
        return image


class Compose:
    def __init__(self, *steps) -> None:
        self.steps = steps

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        return image
