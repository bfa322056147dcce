"""ImageNet ResNets of He et al. 2016 (ResNet-18/34/50) with projection shortcuts.

``stem="imagenet"`` is the original 7×7/2 convolution followed by a 3×3/2 max-pool;
``stem="cifar"`` is the usual small-image variant, a 3×3/1 convolution and no max-pool.
The bottleneck puts its stride on the 3×3 convolution (the common "v1.5" layout; the
parameter count is the same as the paper's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gkpd.models.registry import register

STEMS = ("imagenet", "cifar")


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Shortcut of a block: identity, or a strided 1×1 convolution + BN (option B)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = projection(in_channels, width, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.downsample(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand by 4 (ResNet-50 and up).

    Subclasses change the residual branch by overriding :meth:`residual`
    (see :mod:`gkpd.models.se_resnet`).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = projection(in_channels, out_channels, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.downsample(x))


class ResNet(nn.Module):
    """Four stages of 64/128/256/512 base width; ``layers`` blocks per stage."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        stages = []
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(block(channels, width, stride if j == 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)
        init_resnet(self, zero_init_residual)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.fc(x)


def init_resnet(model: nn.Module, zero_init_residual: bool = False) -> None:
    """He-normal convolutions, unit BN; optionally zero the last BN of every residual branch."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if hasattr(m, "last_bn"):
                nn.init.zeros_(m.last_bn.weight)


@register("resnet18")
def resnet18(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 (11.69M parameters at 1000 classes with the ImageNet stem)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, stem, zero_init_residual)


@register("resnet34")
def resnet34(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-34 (21.80M parameters at 1000 classes with the ImageNet stem)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, stem, zero_init_residual)


@register("resnet50")
def resnet50(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 (25.56M parameters at 1000 classes with the ImageNet stem)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, stem, zero_init_residual)
