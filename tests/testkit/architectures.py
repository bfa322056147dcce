"""Architectures of the structure torchvision and timm give them, written here because neither
imports with the CPU torch of the tests (torchvision's wheels need CUDA torch; timm imports
torchvision). Widths are parameters so that tests run small copies and the planning benchmark
the full-width ResNet-18; the layer structure (kernels, strides, groups, where a parent reads
its child's weight, channels-last linears) is the real one.

``ARCHITECTURES`` maps a name to ``(build, example input shape)`` for the tests: ``build()``
returns the small model, seeded by the caller.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# ResNet-18 -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3×3 convolutions; a strided 1×1 convolution + BN on the shortcut where the shape
    changes (torchvision's ``downsample``)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """7×7/2 stem + 3×3/2 max-pool, four stages of two basic blocks (widths ``width`` × 1, 2,
    4, 8; stride 2 from the second stage on), global average pool, fc. ``width=64`` is the
    ImageNet ResNet-18 (11.7 M parameters with 1000 classes)."""

    def __init__(self, width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, channels = [], width
        for i in range(4):
            out = width * 2**i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(channels, out, stride), BasicBlock(out, out)))
            channels = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# MobileNetV3 and EfficientNet ----------------------------------------------------------------


def scaled(channels: int, width_mult: float) -> int:
    """``channels`` × ``width_mult``, rounded down to a multiple of 8 (at least 8)."""
    return max(8, int(channels * width_mult) // 8 * 8)


def conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1,
            groups: int = 1, activation: type[nn.Module] | None = None) -> nn.Sequential:
    """Convolution (same padding, no bias), BatchNorm, and an optional activation."""
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                        bias=False), nn.BatchNorm2d(out_channels)]
    if activation is not None:
        layers.append(activation())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Global pool, 1×1 conv down, activation, 1×1 conv up, gate, scale the input."""

    def __init__(self, channels: int, squeezed: int, activation: type[nn.Module],
                 gate: type[nn.Module]) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.activation = activation()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.gate(scale)


class InvertedResidual(nn.Module):
    """1×1 expand, k×k depthwise, optional squeeze-and-excitation, 1×1 linear project; the
    input is added back where the shape allows. MobileNetV3's block (``activation`` ReLU or
    Hardswish, SE gated by Hardsigmoid on ``expanded // 4`` channels) and EfficientNet's
    MBConv (SiLU, SE gated by Sigmoid on ``in_channels // 4``, no stochastic depth) differ
    only in those settings."""

    def __init__(self, in_channels: int, expanded: int, out_channels: int, kernel: int,
                 stride: int, activation: type[nn.Module], se_channels: int | None,
                 se_gate: type[nn.Module] = nn.Hardsigmoid,
                 se_activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expanded != in_channels:
            layers.append(conv_bn(in_channels, expanded, 1, activation=activation))
        layers.append(conv_bn(expanded, expanded, kernel, stride, groups=expanded,
                              activation=activation))
        if se_channels is not None:
            layers.append(SqueezeExcitation(expanded, se_channels, se_activation, se_gate))
        layers.append(conv_bn(expanded, out_channels, 1))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out


class MobileNetV3(nn.Module):
    """The first six blocks of MobileNetV3-Small, channels times ``width_mult``: 3×3/2
    hardswish stem, inverted residuals with SE and hardswish (ReLU in the first ones), 1×1
    conv, pool, and a Linear–Hardswish–Dropout–Linear classifier."""

    # kernel, expanded, out, SE, hardswish, stride
    SETTINGS = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2),
                (3, 88, 24, False, False, 1), (5, 96, 40, True, True, 2),
                (5, 240, 40, True, True, 1), (5, 144, 48, True, True, 1))

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        channels = scaled(16, width_mult)
        layers = [conv_bn(3, channels, 3, 2, activation=nn.Hardswish)]
        for kernel, expanded, out, se, hardswish, stride in self.SETTINGS:
            expanded, out = scaled(expanded, width_mult), scaled(out, width_mult)
            layers.append(InvertedResidual(
                channels, expanded, out, kernel, stride, nn.Hardswish if hardswish else nn.ReLU,
                scaled(expanded // 4, 1) if se else None,
            ))
            channels = out
        layers.append(conv_bn(channels, 6 * channels, 1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * channels, 8 * channels), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(8 * channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNet(nn.Module):
    """EfficientNet-B0's first four stages of MBConv blocks (SiLU, SE on a quarter of the
    block's input channels, sigmoid gate), channels times ``width_mult``, a 1×1 head conv,
    pool, dropout and fc."""

    # expansion, kernel, stride, out channels, repeats
    SETTINGS = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 1))

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000) -> None:
        super().__init__()
        channels = scaled(32, width_mult)
        layers = [conv_bn(3, channels, 3, 2, activation=nn.SiLU)]
        for expansion, kernel, stride, out, repeats in self.SETTINGS:
            for i in range(repeats):
                out_channels = scaled(out, width_mult)
                layers.append(InvertedResidual(
                    channels, channels * expansion, out_channels, kernel, stride if i == 0 else 1,
                    nn.SiLU, max(1, channels // 4), se_gate=nn.Sigmoid, se_activation=nn.SiLU,
                ))
                channels = out_channels
        layers.append(conv_bn(channels, 4 * channels, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# ConvNeXt ------------------------------------------------------------------------------------


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's stem and downsampling)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7×7 depthwise conv; to channels-last; LayerNorm, Linear ×4, GELU, Linear; layer scale;
    back to channels-first; residual (no stochastic depth)."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """4×4/4 patchify stem + LayerNorm, stages of ConvNeXt blocks separated by LayerNorm and a
    2×2/2 conv, global pool, LayerNorm, fc. ``dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)``
    is ConvNeXt-T."""

    def __init__(self, dims: tuple[int, ...] = (96, 192, 384, 768),
                 depths: tuple[int, ...] = (3, 3, 9, 3), num_classes: int = 1000) -> None:
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            if i:
                layers.append(nn.Sequential(LayerNorm2d(dims[i - 1], eps=1e-6),
                                            nn.Conv2d(dims[i - 1], dim, 2, 2)))
            layers.append(nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth))))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.flatten(self.avgpool(self.features(x)), 1)))


# Transformers --------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: LayerNorm, nn.MultiheadAttention (batch_first), residual;
    LayerNorm, Linear–GELU–Linear MLP, residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=dropout,
                                                    batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        x = x + self.dropout(self.self_attention(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """Patch embedding conv, class token, learned position embedding, encoder blocks, final
    LayerNorm, linear head on the class token. ``patch=16, dim=768, depth=12, heads=12,
    mlp_dim=3072`` is ViT-B/16."""

    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12,
                 heads: int = 12, mlp_dim: int = 3072, num_classes: int = 1000,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch)**2 + 1, dim) * .02)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim, dropout)
                                      for _ in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], dim=1)
        x = self.layers(self.dropout(x + self.pos_embedding))
        return self.head(self.ln(x)[:, 0])


class TransformerClassifier(nn.Module):
    """``nn.TransformerEncoder`` of its own ``nn.TransformerEncoderLayer``s (batch_first,
    nested tensors on, so eval under ``no_grad`` takes torch's fused fast path) on a linear
    embedding of feature vectors; mean over the sequence, linear head. ``forward(x,
    padding_mask=None)``."""

    def __init__(self, features: int = 16, dim: int = 64, heads: int = 4, ff: int = 256,
                 depth: int = 2, num_classes: int = 10, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Linear(features, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=True)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return self.head(self.encoder(self.embed(x), src_key_padding_mask=padding_mask).mean(1))


ARCHITECTURES = {
    "resnet18": (lambda: ResNet18(width=8, num_classes=10), (2, 3, 32, 32)),
    "mobilenet_v3": (lambda: MobileNetV3(num_classes=10), (2, 3, 32, 32)),
    "efficientnet": (lambda: EfficientNet(num_classes=10), (2, 3, 32, 32)),
    "convnext": (lambda: ConvNeXt(dims=(32, 64), depths=(1, 1), num_classes=10),
                 (2, 3, 32, 32)),
    "vit": (lambda: VisionTransformer(image_size=32, patch=8, dim=64, depth=2, heads=4,
                                      mlp_dim=128, num_classes=10, dropout=0.1), (2, 3, 32, 32)),
    "transformer_encoder": (lambda: TransformerClassifier(), (2, 6, 16)),
}
