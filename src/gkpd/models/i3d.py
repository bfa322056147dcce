"""I3D-ResNet-50: ResNet-50 with 3-D convolutions, and inflation of 2-D weights into it.

Carreira & Zisserman 2017 ("Quo Vadis, Action Recognition?") turn an image network into a
video network by inflating every k×k kernel to t×k×k and bootstrapping it from the image
weights: the 2-D kernel is repeated t times along time and divided by t, so that a "boring"
clip of identical frames gives every layer the same activations as the 2-D network on one
frame. The layout here matches :mod:`gkpd.models.resnet` module for module (``conv1``,
``layer3.2.conv2``, ``fc``, ...), so weights move across by name.

Inputs are clips ``(N, C, T, H, W)``. ``inflate="3x3"`` inflates the 3×3 convolution of every
bottleneck to ``time_kernel``×3×3 (Carreira & Zisserman); ``inflate="alternate"`` is the
I3D-ResNet-50 of Wang et al. 2018 (non-local networks), which inflates the first 1×1 of
alternate bottlenecks to ``time_kernel``×1×1 and keeps the 3×3s spatial. The stem is
``stem_time_kernel``×7×7 with temporal stride ``stem_time_stride``; ``temporal_pool`` adds a
3×1×1/2 max-pool in time after ``layer1``.

Time is padded by a separate, parameter-free :class:`TimePad` before each convolution (the
convolutions themselves pad only space). With ``temporal_padding="replicate"`` (default) a
clip of identical frames stays an exact fixed point up to its first and last frame, so
inflation is exact; ``"zeros"`` is the usual zero padding, exact only away from the clip ends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gkpd.models.registry import register
from gkpd.models.resnet import init_resnet

INFLATE = ("3x3", "alternate")
TEMPORAL_PADDING = ("replicate", "zeros")
# Wang et al. 2018, Table 1: which bottlenecks of each stage get a t×1×1 first convolution
ALTERNATE = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
LAYERS = (3, 4, 6, 3)


class TimePad(nn.Module):
    """Pad the time axis of ``(N, C, T, H, W)`` by ``size`` frames on each side."""

    def __init__(self, size: int, mode: str = "replicate") -> None:
        super().__init__()
        if mode not in TEMPORAL_PADDING:
            raise ValueError(f"temporal_padding must be one of {TEMPORAL_PADDING}, got {mode!r}")
        self.size = size
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return x
        pad = (0, 0, 0, 0, self.size, self.size)
        return F.pad(x, pad, mode="constant" if self.mode == "zeros" else "replicate")

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"


class Bottleneck3d(nn.Module):
    """The ResNet-50 bottleneck with kernels t1×1×1, t2×3×3, 1×1×1; spatial stride only."""

    expansion = 4

    def __init__(
        self, in_channels: int, width: int, stride: int, t1: int, t2: int, padding_mode: str
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.pad1 = TimePad(t1 // 2, padding_mode)
        self.conv1 = nn.Conv3d(in_channels, width, (t1, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.pad2 = TimePad(t2 // 2, padding_mode)
        self.conv2 = nn.Conv3d(width, width, (t2, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(width)
        self.conv3 = nn.Conv3d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, (1, stride, stride), bias=False),
                nn.BatchNorm3d(out_channels),
            )
        else:
            self.downsample = nn.Identity()

    @property
    def last_bn(self) -> nn.BatchNorm3d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.pad1(x))))
        out = F.relu(self.bn2(self.conv2(self.pad2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


class I3DResNet50(nn.Module):
    def __init__(
        self,
        num_classes: int = 51,
        in_channels: int = 3,
        time_kernel: int = 3,
        stem_time_kernel: int = 5,
        stem_time_stride: int = 2,
        temporal_pool: bool = True,
        inflate: str = "3x3",
        temporal_padding: str = "replicate",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if inflate not in INFLATE:
            raise ValueError(f"inflate must be one of {INFLATE}, got {inflate!r}")
        for name, value in (("time_kernel", time_kernel), ("stem_time_kernel", stem_time_kernel)):
            if value < 1 or value % 2 == 0:
                raise ValueError(f"{name} must be a positive odd integer, got {value}")
        if stem_time_stride < 1:
            raise ValueError(f"stem_time_stride must be >= 1, got {stem_time_stride}")
        self.stem_pad = TimePad(stem_time_kernel // 2, temporal_padding)
        self.conv1 = nn.Conv3d(
            in_channels,
            64,
            (stem_time_kernel, 7, 7),
            (stem_time_stride, 2, 2),
            (0, 3, 3),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
        self.pool2 = nn.MaxPool3d((3, 1, 1), (2, 1, 1), (1, 0, 0)) if temporal_pool else None
        channels = 64
        stages = []
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), LAYERS, strict=True)):
            stage = []
            for j in range(blocks):
                if inflate == "3x3":
                    t1, t2 = 1, time_kernel
                else:
                    t1, t2 = (time_kernel if ALTERNATE[i][j] else 1), 1
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(Bottleneck3d(channels, width, stride, t1, t2, temporal_padding))
                channels = width * Bottleneck3d.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)
        init_resnet(self, zero_init_residual)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(
                f"I3D expects clips of shape (N, C, T, H, W), got shape {tuple(x.shape)}"
            )
        x = self.maxpool(F.relu(self.bn1(self.conv1(self.stem_pad(x)))))
        x = self.layer1(x)
        if self.pool2 is not None:
            x = self.pool2(x)
        return self.layer4(self.layer3(self.layer2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool3d(self.features(x), 1), 1)
        return self.fc(x)


@register("i3d_resnet50")
def i3d_resnet50(
    num_classes: int = 51,
    in_channels: int = 3,
    time_kernel: int = 3,
    stem_time_kernel: int = 5,
    stem_time_stride: int = 2,
    temporal_pool: bool = True,
    inflate: str = "3x3",
    temporal_padding: str = "replicate",
    zero_init_residual: bool = False,
) -> I3DResNet50:
    """I3D-ResNet-50 for clips ``(N, C, T, H, W)`` (default 51 classes, HMDB-51)."""
    return I3DResNet50(
        num_classes,
        in_channels,
        time_kernel,
        stem_time_kernel,
        stem_time_stride,
        temporal_pool,
        inflate,
        temporal_padding,
        zero_init_residual,
    )


_PAIRS = ((nn.Conv3d, nn.Conv2d), (nn.BatchNorm3d, nn.BatchNorm2d), (nn.Linear, nn.Linear))


def _check_conv(name: str, conv3d: nn.Conv3d, conv2d: nn.Conv2d) -> None:
    got = (
        tuple(conv3d.weight.shape[:2]) + tuple(conv3d.weight.shape[3:]),
        conv3d.stride[1:],
        conv3d.padding[1:],
        conv3d.dilation[1:],
        conv3d.groups,
        conv3d.bias is None,
    )
    want = (
        tuple(conv2d.weight.shape),
        conv2d.stride,
        conv2d.padding,
        conv2d.dilation,
        conv2d.groups,
        conv2d.bias is None,
    )
    if got != want or conv2d.padding_mode != "zeros":
        raise ValueError(
            f"layer {name!r}: 2-D convolution (weight, stride, padding, dilation, groups, "
            f"no bias) {want} does not match the spatial part of the 3-D one {got}"
        )


@torch.no_grad()
def inflate_from_2d(model3d: nn.Module, model2d: nn.Module) -> nn.Module:
    """Copy a 2-D model's weights into its 3-D counterpart, in place, matching by name.

    Each Conv3d gets the Conv2d weight of the same name repeated along time and divided by
    the temporal extent; BatchNorm3d gets the BatchNorm2d affine parameters and running
    statistics; Linear layers are copied. Raises ``ValueError`` when the two models do not
    have the same layers with the same spatial shapes. Returns ``model3d``.
    """
    source = dict(model2d.named_modules())
    target = {
        n: m for n, m in model3d.named_modules() if isinstance(m, tuple(p[0] for p in _PAIRS))
    }
    weighted2d = {n for n, m in source.items() if isinstance(m, tuple(p[1] for p in _PAIRS))}
    if weighted2d != set(target):
        missing = sorted(set(target) - weighted2d)[:5]
        extra = sorted(weighted2d - set(target))[:5]
        raise ValueError(
            "model2d does not have the layers of model3d: "
            f"missing in model2d {missing}, not in model3d {extra}"
        )
    for name, m3 in target.items():
        m2 = source[name]
        kind3, kind2 = next(p for p in _PAIRS if isinstance(m3, p[0]))
        if not isinstance(m2, kind2):
            raise ValueError(
                f"layer {name!r}: expected {kind2.__name__} in model2d, got {type(m2).__name__}"
            )
        if isinstance(m3, nn.Conv3d):
            _check_conv(name, m3, m2)
            time = m3.weight.shape[2]
            m3.weight.copy_(m2.weight.unsqueeze(2).expand_as(m3.weight) / time)
            if m3.bias is not None:
                m3.bias.copy_(m2.bias)
        elif isinstance(m3, nn.BatchNorm3d):
            if m3.num_features != m2.num_features or m3.affine != m2.affine:
                raise ValueError(
                    f"layer {name!r}: BatchNorm2d({m2.num_features}, affine={m2.affine}) does "
                    f"not match BatchNorm3d({m3.num_features}, affine={m3.affine})"
                )
            m3.load_state_dict(m2.state_dict())
            m3.eps, m3.momentum = m2.eps, m2.momentum
        else:
            if m3.weight.shape != m2.weight.shape or (m3.bias is None) != (m2.bias is None):
                raise ValueError(
                    f"layer {name!r}: Linear weight {tuple(m2.weight.shape)} does not match "
                    f"{tuple(m3.weight.shape)}"
                )
            m3.load_state_dict(m2.state_dict())
    return model3d


def i3d_from_resnet50(model2d: nn.Module, time_kernel: int = 3, **kwargs) -> I3DResNet50:
    """Build an I3D-ResNet-50 from a 2-D ResNet-50 (ImageNet stem) by inflating its weights.

    ``num_classes`` and ``in_channels`` come from ``model2d``; other keyword arguments go to
    :class:`I3DResNet50`. The result has ``model2d``'s dtype, device and train/eval mode.
    """
    conv1, fc = getattr(model2d, "conv1", None), getattr(model2d, "fc", None)
    if not isinstance(conv1, nn.Conv2d) or not isinstance(fc, nn.Linear):
        raise TypeError(
            f"model2d must be a 2-D ResNet-50 with conv1 and fc, got {type(model2d).__name__}"
        )
    if getattr(model2d, "stem", "imagenet") != "imagenet":
        raise ValueError(
            f"model2d must use the 'imagenet' stem to be inflated, got stem={model2d.stem!r}"
        )
    model3d = I3DResNet50(fc.out_features, conv1.in_channels, time_kernel, **kwargs)
    model3d.to(device=conv1.weight.device, dtype=conv1.weight.dtype)
    inflate_from_2d(model3d, model2d)
    return model3d.train(model2d.training)
