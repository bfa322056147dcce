"""MobileNetV2 (Sandler et al. 2018): inverted residuals with linear bottlenecks.

``stem="imagenet"`` is the paper's network (output stride 32). ``stem="cifar"`` is the common
small-image variant: stride 1 in the stem convolution and in the first stride-2 stage
(24 channels), so a 32×32 image ends at 4×4.
"""

from __future__ import annotations

import torch
from torch import nn

from gkpd.models.registry import register

STEMS = ("imagenet", "cifar")

# expansion t, output channels c, repeats n, first stride s (Table 2 of the paper)
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU6(nn.Sequential):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                kernel_size // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1×1 expand (skipped when t = 1) → 3×3 depthwise → 1×1 linear projection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = round(in_channels * expansion)
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(ConvBNReLU6(in_channels, hidden, 1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        width_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.stem = stem
        cifar = stem == "cifar"
        channels = make_divisible(32 * width_mult)
        self.last_channels = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNReLU6(in_channels, channels, 3, 1 if cifar else 2)]
        first_downsampling_stage = True
        for t, c, n, s in SETTINGS:
            if s == 2 and first_downsampling_stage:
                first_downsampling_stage = False
                if cifar:
                    s = 1
            out_channels = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
        layers.append(ConvBNReLU6(channels, self.last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


@register("mobilenetv2", aliases=("mobilenet_v2", "mobilenetv2_100"))  # torchvision, timm
def mobilenetv2(
    num_classes: int = 1000,
    in_channels: int = 3,
    stem: str = "imagenet",
    width_mult: float = 1.0,
    dropout: float = 0.2,
) -> MobileNetV2:
    """MobileNetV2 (3.50M parameters at 1000 classes, width 1.0)."""
    return MobileNetV2(num_classes, in_channels, stem, width_mult, dropout)
