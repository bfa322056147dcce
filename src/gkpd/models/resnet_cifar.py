"""CIFAR ResNets of He et al. 2016 (§4.2): 6n+2 layers, 16/32/64 channels, option-A shortcuts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gkpd.models.registry import register


class PadShortcut(nn.Module):
    """Parameter-free shortcut (option A): subsample by stride, zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """``widths``: channels of the three stages (default the paper's 16/32/64), non-decreasing,
    so that narrower networks of the same family can be built."""

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        widths = tuple(widths)
        if (
            len(widths) != 3
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
            or not widths[0] <= widths[1] <= widths[2]
        ):
            raise ValueError(
                f"widths must be 3 positive ints in non-decreasing order, got {widths!r}"
            )
        self.widths = widths
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for width, stride in zip(widths, (1, 2, 2), strict=True):
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(channels, width, stride if i == 0 else 1))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _make(depth: int):
    def build(
        num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, widths=widths)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016)."
    return build


for _depth in (20, 32, 44, 56, 110):
    register(f"resnet{_depth}")(_make(_depth))
