"""SE-ResNet-50 (Hu et al. 2018): ResNet-50 bottlenecks gated by squeeze-and-excitation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gkpd.models.registry import register
from gkpd.models.resnet import Bottleneck, ResNet


class SqueezeExcitation(nn.Module):
    """Global average pool → FC (C → C/r) → ReLU → FC (C/r → C) → sigmoid, scaling channels."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if reduction < 1 or channels % reduction:
            raise ValueError(
                f"reduction must be a positive divisor of channels {channels}, got {reduction}"
            )
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(scale))))
        return x * scale[:, :, None, None]


class SEBottleneck(Bottleneck):
    """The ResNet-50 bottleneck with its residual branch recalibrated before the addition."""

    reduction = 16

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__(in_channels, width, stride)
        self.se = SqueezeExcitation(width * self.expansion, self.reduction)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().residual(x))


@register("se_resnet50", aliases=("seresnet50",))  # timm
def se_resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """SE-ResNet-50, reduction 16 (28.09M parameters at 1000 classes, ImageNet stem)."""
    return ResNet(SEBottleneck, (3, 4, 6, 3), num_classes, in_channels, stem, zero_init_residual)
