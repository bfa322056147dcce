"""Geometry of convolutions and of the two stages of a Kronecker convolution: argument
normalisation, padding, output sizes, how groups split across the factors, and where the
stride and padding of a two-stage convolution go (docs/design.md §3–§4).

A leaf module: it imports nothing from gkpd; :mod:`gkpd.counting` builds its MACs formulas on
it and the Kronecker layers run by it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

__all__ = [
    "ORDERS",
    "conv_output_shape",
    "group_split",
    "ntuple",
    "padding_stage",
    "resolve_padding",
    "stage_paddings",
    "stage_strides",
]

ORDERS = ("b_first", "a_first")


def ntuple(name: str, value: object, n: int, *, minimum: int = 1) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of ints as a tuple, each ``>= minimum``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * n
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != n:
        raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
        if v < minimum:
            raise ValueError(f"{name} {value!r} must have entries >= {minimum}")
    return tuple(int(v) for v in value)


def resolve_padding(
    padding: int | str | Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
) -> tuple[tuple[int, int], ...]:
    """Per spatial axis ``(left, right)`` padding, as ``nn.Conv*d`` applies it.

    ``"same"`` pads ``d·(k−1)`` in total with the extra element on the right (torch's rule)
    and needs stride 1; ``"valid"`` pads nothing.
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' needs stride 1, got stride {tuple(stride)}")
            pairs = []
            for k, d in zip(kernel_size, dilation, strict=True):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(f"padding {padding!r} is not supported: expected 'same', 'valid' or ints")
    return tuple((p, p) for p in ntuple("padding", padding, n, minimum=0))


def conv_output_shape(
    input_spatial: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int],
) -> tuple[int, ...]:
    """Spatial output size of a convolution (padding as ``(left, right)`` pairs)."""
    out = []
    for size, k, s, (pl, pr), d in zip(
        input_spatial, kernel_size, stride, padding, dilation, strict=True
    ):
        o = (size + pl + pr - d * (k - 1) - 1) // s + 1
        if o < 1:
            raise ValueError(
                f"input size {tuple(input_spatial)} is too small for kernel_size "
                f"{tuple(kernel_size)}, dilation {tuple(dilation)} and padding {tuple(padding)}"
            )
        out.append(o)
    return tuple(out)


def group_split(
    groups: int, a_shape: Sequence[int], b_shape: Sequence[int]
) -> tuple[int, int]:
    """How ``groups`` of a convolution split across the factors: ``(g1, g2)``, ``g1·g2 = groups``.

    Output channel ``f = f1·F2 + f2`` belongs to group ``f // (F/groups)``. That is a product
    of an A-group and a B-group exactly when ``groups`` divides ``F1`` (``g1 = groups``) or
    when the group size ``F/groups`` divides ``F2`` (``g1 = F1``, ``g2 = groups/F1``; this is
    the case of every split of a depthwise convolution). Otherwise ``ValueError``.
    """
    f1, f2 = int(a_shape[0]), int(b_shape[0])
    if groups < 1 or (f1 * f2) % groups:
        raise ValueError(f"groups {groups} does not divide out_channels {f1 * f2}")
    if f1 % groups == 0:
        return groups, 1
    if groups % f1 == 0 and f2 % (groups // f1) == 0:
        return f1, groups // f1
    raise ValueError(
        f"a_shape {tuple(a_shape)} is incompatible with groups={groups}: the out-channel "
        f"factor a_shape[0]={f1} must be a multiple of groups, or divide groups with "
        f"groups/a_shape[0] dividing b_shape[0]={f2}"
    )


def stage_strides(
    order: str, a_kernel: Sequence[int], b_kernel: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides ``(first stage, second stage)``: an axis's stride moves into the first stage
    where the second stage's factor has kernel extent 1 on that axis."""
    second = a_kernel if order == "b_first" else b_kernel
    s1 = tuple(s if k == 1 else 1 for k, s in zip(second, stride, strict=True))
    s2 = tuple(1 if k == 1 else s for k, s in zip(second, stride, strict=True))
    return s1, s2


def stage_paddings(
    order: str,
    a_kernel: Sequence[int],
    b_kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    padding_mode: str = "zeros",
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The zero padding of each stage of a Kronecker convolution, per axis ``(first stage,
    second stage)``; ``None`` where the padding runs with ``F.pad`` before both stages
    (non-zero modes, asymmetric padding).

    An axis is padded in the second stage where the first stage's kernel extent on it is 1
    and its stride 1 (along that axis the first stage commutes with zero padding), else in
    the first. Padding an axis its stage does not convolve makes the tensor between the
    stages larger for nothing: A (1, C, 3, 1) ⊗ B (F, 1, 1, 3) padded (1, 1) in its first
    stage ran 1.35x slower than with each axis padded where its kernel is (a 16-channel
    layer at 32 px, batch 64, NCHW, CPU, 2 threads)."""
    n = len(padding)
    if padding_mode != "zeros" or any(pl != pr for pl, pr in padding):
        return None if any(p for pair in padding for p in pair) else ((0,) * n, (0,) * n)
    first = b_kernel if order == "b_first" else a_kernel
    s1, _ = stage_strides(order, a_kernel, b_kernel, stride)
    second = tuple(k == 1 and s == 1 for k, s in zip(first, s1, strict=True))
    pads = tuple(pl for pl, _ in padding)
    return (tuple(0 if late else p for p, late in zip(pads, second, strict=True)),
            tuple(p if late else 0 for p, late in zip(pads, second, strict=True)))


def padding_stage(
    order: str,
    a_kernel: Sequence[int],
    b_kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[tuple[int, int]],
    padding_mode: str = "zeros",
) -> str:
    """Deprecated: :func:`stage_paddings` pads each axis in its own stage. ``"input"``,
    ``"second"`` (no axis padded in the first stage) or ``"first"`` (some are)."""
    warnings.warn("gkpd.geometry.padding_stage is deprecated: use stage_paddings",
                  DeprecationWarning, stacklevel=2)
    paddings = stage_paddings(order, a_kernel, b_kernel, stride, padding, padding_mode)
    if paddings is None:
        return "input"
    return "first" if any(paddings[0]) or not any(paddings[1]) else "second"
