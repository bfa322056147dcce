"""One N-d Kronecker convolution (docs/design.md §3); ``KroneckerConv1d/2d/3d`` fix the dimension.

The weight ``(F, C/groups, *K)`` is ``Σ_r A_r ⊗ B_r`` with ``A: (F1, C1, *K1)`` and
``B: (F2, C2, *K2)``; the convolution runs as two smaller convolutions, in whichever order
costs fewer MACs for the input at hand.

Over 400 lines on purpose: the layer's stage orders, channel paths and weight path share its
factor bookkeeping and cached stage plans; split apart they would pass most of it around.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkpd.counting import (
    ORDERS,
    best_order,
    conv_macs,
    group_split,
    kronecker_conv_intermediate_numel,
    kronecker_conv_order_macs,
    ntuple,
    resolve_padding,
    stage_paddings,
    stage_strides,
)
from gkpd.decompose import as_shape, b_shape_for, check_rank
from gkpd.layers.base import (
    CHANNEL_PATHS,
    WEIGHT_PATH,
    KroneckerLayer,
    Steps,
    dense_factors,
    in_func_transform,
)
from gkpd.layout import has_strides_of, in_memory_format, memory_format

__all__ = ["KroneckerConv1d", "KroneckerConv2d", "KroneckerConv3d", "KroneckerConvNd"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DENSE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class _StagePlan(NamedTuple):
    pad_input: list[int] | None  # F.pad argument when padding runs before both stages
    pad1: tuple[int, ...]
    pad2: tuple[int, ...]
    s1: tuple[int, ...]
    s2: tuple[int, ...]
    dil1: tuple[int, ...]
    dil2: tuple[int, ...]
    pointwise1: bool  # the stage is a (grouped) matmul
    pointwise2: bool


def _regroup(y: Tensor, dims: Sequence[int], perm: Sequence[int], out: Sequence[int]) -> Tensor:
    """``y.reshape(dims).permute(perm).reshape(out)``, as one view when the permutation only
    moves dims of size 1.

    ``perm`` keeps the batch dim ``dims[0]`` first, so only ``dims[1:]`` are compared with 1:
    the batch size is never inspected, and stays symbolic under torch.export and ONNX export.
    """
    kept = [p for p in perm[1:] if dims[p] != 1]
    if perm[0] == 0 and kept == sorted(kept):
        return y.reshape(out)
    return y.reshape(dims).permute(perm).reshape(out)


def _is_nchw(x: Tensor) -> bool:
    """Whether ``x`` is laid out NCHW: contiguous, and not with the exact strides of
    channels_last where it is contiguous in both layouts (one channel, or one pixel; as
    :func:`gkpd.layout.in_memory_format` converts such a tensor). Weights follow this
    layout: a channels_last weight beside a one-channel NCHW input sent torch 2.13's float32
    convolution to a kernel that returned values of 1e30 (input (2, 1, 13, 4), kernel (1, 3),
    stride (1, 3)), where ``nn.Conv2d`` is right."""
    if not x.is_contiguous():
        return False
    last = memory_format("channels_last", x.dim())
    if last is None or not x.is_contiguous(memory_format=last):
        return True
    return not has_strides_of(x, last)


def _in_format(weights: object, fmt: torch.memory_format, dim: int) -> object:
    """``weights`` (a tensor, or tuples of tensors and ints) with its ``dim``-d tensors in
    ``fmt``."""
    if isinstance(weights, Tensor):
        return in_memory_format(weights, fmt) if weights.dim() == dim else weights
    if isinstance(weights, tuple):
        return tuple(_in_format(w, fmt, dim) for w in weights)
    return weights


def _repeat_each_channel(x: Tensor, times: int) -> Tensor:
    """``x`` with each channel repeated ``times`` in a row, in ``x``'s layout (channels
    innermost for channels_last)."""
    if _is_nchw(x):
        return x.unsqueeze(2).expand(-1, -1, times, *x.shape[2:]).flatten(1, 2)
    last = x.movedim(1, -1)
    return last.unsqueeze(-1).expand(*last.shape, times).flatten(-2).movedim(-1, 1)


def _plain_dilation(kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """``dilation`` with 1 wherever the kernel is 1 (where it changes nothing): torch sends
    any dilated convolution to its slow generic kernel, which a split such as A (1, C, 3, 1)
    ⊗ B (F, 1, 1, 3) would otherwise hit in every layer (A's kernel dilated by (1, 3))."""
    return tuple(d if k > 1 else 1 for k, d in zip(kernel, dilation, strict=True))


def _is_pointwise(kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int]) -> bool:
    return all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding)


def _stage(
    x: Tensor,
    w: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    pointwise: bool,
) -> Tensor:
    """One stage: a convolution, or a (grouped) matmul when it is pointwise (much faster on
    CPU than a 1×1 conv with few channels and a large batch)."""
    if not pointwise:
        return _CONV[w.dim() - 2](x, w, None, stride, padding, dilation, groups)
    m, c = x.shape[:2]
    f = w.shape[0]
    if groups == 1:
        y = torch.matmul(w.reshape(f, c), x.reshape(m, c, -1))
    else:
        wg = w.reshape(groups, f // groups, c // groups)
        y = torch.matmul(wg, x.reshape(m, groups, c // groups, -1))
    return y.reshape(m, f, *x.shape[2:])


def conv_channel_paths(a_shape: Sequence[int], b_shape: Sequence[int], groups: int
                       ) -> tuple[str, ...]:
    """The ``CHANNEL_PATHS`` a Kronecker convolution with these factor shapes can run:
    ``b_first_channels`` when ``C1 == 1`` (B over all input channels, then A per output
    channel of B, then a channel shuffle) or ``F2 == 1`` (B per input-channel block, then A
    over all); ``a_first_channels`` when ``C2 == 1`` (A over all input channels, then B per
    output channel of A). Ungrouped convolutions only."""
    if groups != 1:
        return ()
    paths = []
    if a_shape[1] == 1 or b_shape[0] == 1:
        paths.append("b_first_channels")
    if b_shape[1] == 1:
        paths.append("a_first_channels")
    return tuple(paths)


def on_channel_path(stage_order: str, a_shape: Sequence[int], b_shape: Sequence[int], groups: int
                    ) -> str:
    """What path ``"auto"`` runs for a cheaper ``stage_order``: its channel path where the
    factor shapes allow one (the same MACs, no channels folded into the batch), else
    ``stage_order`` itself."""
    paths = [p for p in conv_channel_paths(a_shape, b_shape, groups)
             if CHANNEL_PATHS[p] == stage_order]
    return paths[0] if paths else stage_order


def check_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")


def uniform_factor_bound(fan_in: int, rank: int) -> float:
    """Bound of the uniform init of both factors so that ``Var(Σ_r A_r ⊗ B_r)`` equals torch's
    default dense init variance ``1/(3·fan_in)`` (kaiming_uniform with a=√5)."""
    var_w = 1.0 / (3.0 * fan_in)
    var_factor = math.sqrt(var_w / rank)  # Var(W) = R·Var(A)·Var(B), Var(A) = Var(B)
    return math.sqrt(3.0 * var_factor)


class KroneckerConvNd(KroneckerLayer):
    """Convolution whose weight is ``Σ_r a[r] ⊗ b[r]`` (any number of spatial dims).

    Arguments are those of ``nn.Conv*d``, then keyword-only ``a_shape`` (the A-factor shape
    ``(F1, C1, *K1)`` of the weight ``(out_channels, in_channels/groups, *kernel_size)``),
    ``rank`` (``None``: full Kronecker rank), ``device`` and ``dtype``. The number of spatial
    dims is fixed by the subclass, or taken from ``len(a_shape) - 2`` here.

    ``path`` is ``"auto"`` (default: the stage order with fewer MACs for the input size, run
    on its channel path where the factor shapes allow one), ``"b_first"``, ``"a_first"``,
    ``"weight"`` (the dense convolution with the reconstructed weight, cached at inference), or
    one of ``channel_paths()``.
    """

    _spatial_dims: int | None = None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        a_shape: Sequence[int],
        rank: int | None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        a = as_shape("a_shape", a_shape)
        n = self._spatial_dims if self._spatial_dims is not None else len(a) - 2
        if n not in _CONV:
            raise ValueError(
                f"a_shape {a} has {len(a)} modes, expected 3 to 5 (out, in, *kernel)"
            )
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups:
            raise ValueError(f"in_channels {in_channels} is not divisible by groups {groups}")
        if out_channels % groups:
            raise ValueError(f"out_channels {out_channels} is not divisible by groups {groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"padding_mode {padding_mode!r} is not supported: expected one of "
                f"{_PADDING_MODES}"
            )
        check_dtype(dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ntuple("kernel_size", kernel_size, n)
        self.stride = ntuple("stride", stride, n)
        self.dilation = ntuple("dilation", dilation, n)
        self.padding = padding if isinstance(padding, str) else ntuple(
            "padding", padding, n, minimum=0
        )
        self._pads = resolve_padding(self.padding, self.kernel_size, self.stride, self.dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        weight_shape = (out_channels, in_channels // groups, *self.kernel_size)
        if len(a) != len(weight_shape):
            raise ValueError(
                f"a_shape {a} has {len(a)} modes, expected {len(weight_shape)} like the weight "
                f"shape {weight_shape}"
            )
        self.a_shape = a
        self.b_shape = b_shape_for(weight_shape, a)
        self.rank = check_rank(rank, self.a_shape, self.b_shape)
        self._g1, self._g2 = group_split(groups, self.a_shape, self.b_shape)
        self._path = "auto"
        self._path_cache: dict[tuple[int, ...], str] = {}
        self._plans = {order: self._make_plan(order) for order in ORDERS}
        self._weight_padding = self._padding_of_weight_path()
        factory = {"device": device, "dtype": dtype}
        self.a = nn.Parameter(torch.empty(self.rank, *self.a_shape, **factory))
        self.b = nn.Parameter(torch.empty(self.rank, *self.b_shape, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def reset_parameters(self) -> None:
        """Init so the reconstructed weight has the variance of the dense layer's default."""
        fan_in = (self.in_channels // self.groups) * math.prod(self.kernel_size)
        bound = uniform_factor_bound(fan_in, self.rank)
        nn.init.uniform_(self.a, -bound, bound)
        nn.init.uniform_(self.b, -bound, bound)
        if self.bias is not None:
            b = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -b, b)

    @classmethod
    def from_dense(
        cls, module: nn.Module, *, a_shape: Sequence[int], rank: int | None = None,
        input_covariance: Tensor | None = None, damping: float | None = None,
    ) -> KroneckerConvNd:
        """The GKPD of ``module.weight`` (optimal for ``rank``; exact for ``rank=None``).

        With ``input_covariance`` (``E[x xᵀ]`` of the layer's input patches in the weight's
        ``(c, k…)`` order, e.g. :class:`gkpd.whiten.InputCovariance`) the factors minimise the
        output error on such inputs instead (:func:`gkpd.whiten.decompose_whitened`, damped by
        ``damping``, default 0.01)."""
        if not isinstance(module, nn.modules.conv._ConvNd) or module.transposed:
            raise TypeError(f"module must be an nn.Conv1d/2d/3d, got {type(module).__name__}")
        n = len(module.kernel_size)
        if cls._spatial_dims is not None and cls._spatial_dims != n:
            raise TypeError(
                f"{cls.__name__}.from_dense expects an nn.Conv{cls._spatial_dims}d, got "
                f"{type(module).__name__}"
            )
        weight = module.weight
        if not weight.is_floating_point():
            raise TypeError(f"module.weight must have a floating dtype, got {weight.dtype}")
        layer_cls = cls if cls._spatial_dims is not None else _BY_DIMS[n]
        factors = dense_factors(weight, a_shape, rank, input_covariance, damping)
        layer = layer_cls(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.dilation, module.groups, module.bias is not None,
            module.padding_mode, a_shape=a_shape, rank=factors.rank,
            device=weight.device, dtype=weight.dtype,
        )
        layer._copy_from(factors, module)
        return layer

    def to_dense(self) -> nn.Module:
        """An ``nn.Conv*d`` with the same settings and the reconstructed weight."""
        n = len(self.kernel_size)
        conv = _DENSE[n](
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, self.bias is not None, self.padding_mode,
            device=self.a.device, dtype=self.a.dtype,
        )
        return self._copy_into(conv)

    # ------------------------------------------------------------------ cost and path

    def order_macs(self, input_shape: Sequence[int]) -> dict[str, int]:
        """MACs of each stage order for an input of ``input_shape`` (``(N, C, *spatial)``)."""
        n = len(self.kernel_size)
        shape = tuple(int(s) for s in input_shape)
        batch = shape[0] if len(shape) == n + 2 else 1
        return kronecker_conv_order_macs(
            shape[-n:], self.a_shape, self.b_shape, self.rank, stride=self.stride,
            padding=self._pads_as_arg(), dilation=self.dilation, groups=self.groups,
            batch=batch, padding_mode=self.padding_mode,
        )

    def channel_paths(self) -> tuple[str, ...]:
        return conv_channel_paths(self.a_shape, self.b_shape, self.groups)

    def _pads_as_arg(self) -> str | tuple[int, ...]:
        return self.padding if isinstance(self.padding, str) else tuple(self.padding)

    def dense_macs(self, input_shape: Sequence[int]) -> int:
        n = len(self.kernel_size)
        shape = tuple(int(s) for s in input_shape)
        return conv_macs(
            shape[-n:], self.in_channels, self.out_channels, self.kernel_size, self.stride,
            self._pads_as_arg(), self.dilation, self.groups,
            batch=shape[0] if len(shape) == n + 2 else 1,
        )

    def resolve_path(self, input_shape: Sequence[int]) -> str:
        """The path that runs for ``input_shape``: ``self.path``; if auto, the cheaper stage
        order, on its channel path where there is one. A channel path does the same MACs
        without folding channels into the batch: on ResNet-32 5x (error plan, CPU, 2 threads)
        it made the model 1.19x faster at batch 1 and 1.05x at batch 64 in channels_last, and
        a training step no slower."""
        if self._path != "auto":
            return self._path
        key = tuple(input_shape[-len(self.kernel_size):])
        path = self._path_cache.get(key)
        if path is None:
            order = best_order(self.order_macs((1, self.in_channels, *key)))
            path = on_channel_path(order, self.a_shape, self.b_shape, self.groups)
            self._path_cache[key] = path
        return path


    # ------------------------------------------------------------------ forward

    def _make_plan(self, order: str) -> _StagePlan:
        """Padding, strides and dilations of both stages for ``order`` (fixed per layer)."""
        k1, k2 = self.a_shape[2:], self.b_shape[2:]
        paddings = stage_paddings(order, k1, k2, self.stride, self._pads, self.padding_mode)
        pad_input = None
        if paddings is None:
            pad_input = [p for pair in reversed(self._pads) for p in pair]
            paddings = ((0,) * len(k1), (0,) * len(k1))
        pad1, pad2 = paddings
        s1, s2 = stage_strides(order, k1, k2, self.stride)
        dil_k2 = tuple(d * k for d, k in zip(self.dilation, k2, strict=True))
        first, second = (k2, k1) if order == "b_first" else (k1, k2)
        return _StagePlan(
            pad_input,
            pad1,
            pad2,
            s1,
            s2,
            _plain_dilation(first, self.dilation if order == "b_first" else dil_k2),
            _plain_dilation(second, dil_k2 if order == "b_first" else self.dilation),
            _is_pointwise(first, s1, pad1),
            _is_pointwise(second, s2, pad2),
        )

    def _padding_of_weight_path(self) -> tuple[list[int] | None, tuple[int, ...]]:
        """``(F.pad argument or None, the conv's padding)`` of the weight path: torch's conv
        pads both sides alike and with zeros only, so other padding runs before it."""
        n = len(self.kernel_size)
        if self.padding_mode != "zeros" or any(left != right for left, right in self._pads):
            return [p for pair in reversed(self._pads) for p in pair], (0,) * n
        return None, tuple(left for left, _ in self._pads)

    def _run(self, x: Tensor, step: Steps) -> Tensor:
        """The forward, each tensor operation taken through ``step``."""
        n = len(self.kernel_size)
        if x.dim() not in (n + 1, n + 2):
            raise ValueError(
                f"input must have {n + 1} or {n + 2} dims (C, *spatial) or (N, C, *spatial), "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[-n - 1] != self.in_channels:
            raise ValueError(
                f"input has {x.shape[-n - 1]} channels, expected in_channels={self.in_channels}"
            )
        unbatched = x.dim() == n + 1
        if unbatched:
            x = step(x, lambda t: t.unsqueeze(0))
        # no elements: the stages' reshapes cannot infer a size from none; the dense op can
        path = WEIGHT_PATH if x.numel() == 0 else self.resolve_path(x.shape)
        # forced (auto's fewer MACs bound the tensor between the stages)
        if self._path in ORDERS and path != WEIGHT_PATH:
            self._refuse_oversized(path, x, lambda: kronecker_conv_intermediate_numel(
                tuple(x.shape[2:]), self.a_shape, self.b_shape, self.rank, stride=self.stride,
                padding=self._pads_as_arg(), dilation=self.dilation, groups=self.groups,
                batch=x.shape[0], padding_mode=self.padding_mode,
            )[path])
        if path == WEIGHT_PATH:
            y = self._with_weight(x, step)
        else:
            plan = self._plans[CHANNEL_PATHS.get(path, path)]
            if plan.pad_input is not None:
                x = self._pad(x, plan.pad_input, step)
            if path in CHANNEL_PATHS:
                y = self._over_channels(x, plan, path, step)
            elif path == "b_first":
                y = self._b_first(x, plan, step)
            else:
                y = self._a_first(x, plan, step)
            if self.bias is not None:
                bias = self.bias.view(1, -1, *([1] * n))
                y = step(y, lambda t: t.add_(bias))  # in place: no new output tensor
        return step(y, lambda t: t.squeeze(0)) if unbatched else y

    def _pad(self, x: Tensor, pads: list[int], step: Steps) -> Tensor:
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return step(x, lambda t: F.pad(t, pads, mode=mode))

    def _with_weight(self, x: Tensor, step: Steps) -> Tensor:
        """The dense convolution with the reconstructed weight (the ``"weight"`` path)."""
        pad_input, padding = self._weight_padding
        if pad_input is not None:
            x = self._pad(x, pad_input, step)
        conv = _CONV[len(self.kernel_size)]
        weight = self._derived_for(x, "weight", self.reconstruct_weight)
        bias, stride, dilation, groups = self.bias, self.stride, self.dilation, self.groups
        return step(x, lambda t: conv(t, weight, bias, stride, padding, dilation, groups))

    def _derived_for(self, x: Tensor, name: str, build: Callable[[], object]) -> object:
        """``self._derived(name, build)`` with the weights contiguous in ``x``'s layout: torch
        copies a weight that is not (a permuted reconstruction, or a contiguous weight beside a
        channels_last input) on every call: 19% of a batch-1 forward of ResNet-32's 5x latency
        plan (CPU, 2 threads)."""
        if in_func_transform():  # batched factors: they have no layout to set
            return build()
        layout = "contiguous" if _is_nchw(x) else "channels_last"
        key = name if layout == "contiguous" else f"{name} {layout}"
        return self._derived(key, lambda: _in_format(build(), memory_format(layout, x.dim()),
                                                     x.dim()))

    def _b_first(self, x: Tensor, plan: _StagePlan, step: Steps) -> Tensor:
        r, g1, g2 = self.rank, self._g1, self._g2
        f1, c1, *k1 = self.a_shape
        f2, c2, *k2 = self.b_shape
        n, sp = x.shape[0], x.shape[2:]
        if g2 > 1 and c1 > 1:  # channels (g1, g2, C1, C2) -> (g1, C1, g2, C2)
            x = step(x, lambda t: t.reshape(n, g1, g2, c1, c2, *sp).transpose(2, 3))
        x = step(x, lambda t: t.reshape(n * g1 * c1, g2 * c2, *sp))
        wb = self.b.reshape(r * f2, c2, *k2)
        if g2 > 1:  # output channels (g2, R, F2/g2)
            wb = wb.reshape(r, g2, -1).transpose(0, 1).reshape(-1, c2, *k2)
        y = step(x, lambda t: _stage(t, wb, plan.s1, plan.pad1, plan.dil1, g2, plan.pointwise1))
        sp1 = tuple(y.shape[2:])
        perm1 = (0, 3, 5, 1, 4, 2, *range(6, 6 + len(sp1)))
        y = step(y, lambda t: _regroup(t, (n, g1, c1, g2, r, f2 // g2, *sp1), perm1,
                                       (n * f2, g1 * r * c1, *sp1)))
        wa = self.a.transpose(0, 1).reshape(f1, r * c1, *k1)
        z = step(y, lambda t: _stage(t, wa, plan.s2, plan.pad2, plan.dil2, g1,
                                     plan.pointwise2))  # (N·F2, F1)
        sp2 = tuple(z.shape[2:])
        perm2 = (0, 2, 1, *range(3, 3 + len(sp2)))
        return step(z, lambda t: _regroup(t, (n, f2, f1, *sp2), perm2, (n, f1 * f2, *sp2)))

    def _a_first(self, x: Tensor, plan: _StagePlan, step: Steps) -> Tensor:
        r, g1, g2 = self.rank, self._g1, self._g2
        f1, c1, *k1 = self.a_shape
        f2, c2, *k2 = self.b_shape
        n, sp = x.shape[0], x.shape[2:]
        if g2 * c2 > 1:  # channels (g1, g2, C1, C2) -> batch (N, g2, C2), channels (g1, C1)
            perm0 = (0, 2, 4, 1, 3, *range(5, 5 + len(sp)))
            x = step(x, lambda t: t.reshape(n, g1, g2, c1, c2, *sp).permute(perm0)
                     .reshape(n * g2 * c2, g1 * c1, *sp))
        wa = self.a.reshape(r * f1, c1, *k1)
        if g1 > 1:  # output channels (g1, R, F1/g1)
            wa = wa.reshape(r, g1, -1).transpose(0, 1).reshape(-1, c1, *k1)
        y = step(x, lambda t: _stage(t, wa, plan.s1, plan.pad1, plan.dil1, g1, plan.pointwise1))
        sp1 = tuple(y.shape[2:])
        perm1 = (0, 3, 5, 1, 4, 2, *range(6, 6 + len(sp1)))
        y = step(y, lambda t: _regroup(t, (n, g2, c2, g1, r, f1 // g1, *sp1), perm1,
                                       (n * f1, g2 * r * c2, *sp1)))
        wb = self.b.transpose(0, 1).reshape(f2, r * c2, *k2)
        z = step(y, lambda t: _stage(t, wb, plan.s2, plan.pad2, plan.dil2, g2,
                                     plan.pointwise2))  # (N·F1, F2)
        return step(z, lambda t: t.reshape(n, f1 * f2, *t.shape[2:]))

    def _over_channels(self, x: Tensor, plan: _StagePlan, order: str, step: Steps) -> Tensor:
        """A channel path: two convolutions over channels, with weights taken from the
        factors, the batch left as it is. One stage is grouped, every group with the same
        weight (:meth:`_channel_stages`)."""
        (w1, groups1), (w2, groups2) = self._derived_for(x, order,
                                                         lambda: self._channel_stages(order))
        y = self._shared_groups(x, w1, groups1, plan.s1, plan.pad1, plan.dil1,
                                plan.pointwise1, order, step)
        f1, c1 = self.a_shape[:2]
        f2 = self.b_shape[0]
        if order == "a_first_channels" or c1 != 1 or f1 == 1 or f2 == 1:
            return self._shared_groups(y, w2, groups2, plan.s2, plan.pad2, plan.dil2,
                                       plan.pointwise2, order, step)
        # C1 == 1: per channel of y (F2·R of them), A's F1 outputs: they come as (F2, F1),
        # and the Kronecker product orders them (F1, F2)
        if self.rank == 1:  # a depthwise conv on F1 copies of y gives that order at once
            return self._depthwise(y, w2, groups2, plan.s2, plan.pad2, plan.dil2, order, step,
                                   kronecker_order=True)
        z = self._shared_groups(y, w2, groups2, plan.s2, plan.pad2, plan.dil2,
                                plan.pointwise2, order, step)
        # move the channels along the dim innermost in z's layout (the other is 4x slower)
        if _is_nchw(z):
            return step(z, lambda t: t.unflatten(1, (f2, f1)).transpose(1, 2).flatten(1, 2))
        # movedim(1, -1) is a view, contiguous when z is channels_last
        return step(z, lambda t: t.movedim(1, -1).unflatten(-1, (f2, f1)).transpose(-1, -2)
                    .flatten(-2).movedim(-1, 1))

    def _shared_groups(self, x: Tensor, block: Tensor, groups: int, stride: tuple[int, ...],
                       padding: tuple[int, ...], dilation: tuple[int, ...], pointwise: bool,
                       order: str, step: Steps) -> Tensor:
        """The convolution of ``groups`` channel groups of ``x``, each with ``block``: a
        matmul where it is pointwise on an NCHW tensor (as in the stage orders); depthwise
        where each group has one input channel; else grouped, with ``block`` repeated
        (cached at inference)."""
        if pointwise and _is_nchw(x):  # the groups broadcast: no repeated weight
            n, c = x.shape[:2]
            f = block.shape[0]
            matrix = block.reshape(f, c // groups)
            return step(x, lambda t: torch.matmul(matrix, t.reshape(n, groups, c // groups, -1))
                        .reshape(n, groups * f, *t.shape[2:]))
        conv = _CONV[len(self.kernel_size)]
        if groups == 1:
            return step(x, lambda t: conv(t, block, None, stride, padding, dilation))
        if block.shape[1] == 1 and block.shape[0] > 1:
            return self._depthwise(x, block, groups, stride, padding, dilation, order, step,
                                   kronecker_order=False)
        weight = self._derived_for(x, f"{order} grouped",
                                   lambda: block.repeat(groups, *([1] * (block.dim() - 1))))
        return step(x, lambda t: conv(t, weight, None, stride, padding, dilation, groups))

    def _depthwise(self, x: Tensor, block: Tensor, groups: int, stride: tuple[int, ...],
                   padding: tuple[int, ...], dilation: tuple[int, ...], order: str,
                   step: Steps, *, kronecker_order: bool) -> Tensor:
        """``groups`` convolutions of one channel of ``x`` to ``m = len(block)`` channels, as
        one depthwise convolution (multiplier 1) of ``m`` copies of each channel: oneDNN has
        fast kernels for depthwise convolutions only (with ``m = 2``, 64 channels at 8x8,
        batch 64: 12x faster in channels_last, 3.7x in NCHW). The outputs come as
        ``(groups, m)``, or with ``kronecker_order`` as ``(m, groups)``."""
        m = block.shape[0]
        if kronecker_order:  # copy j of every channel, j = 0..m-1
            copies = step(x, lambda t: torch.cat([t] * m, 1))  # keeps x's layout
            build = lambda: block.repeat_interleave(groups, 0)  # noqa: E731
        else:  # every channel m times in a row
            copies = step(x, lambda t: _repeat_each_channel(t, m))
            build = lambda: block.repeat(groups, *([1] * (block.dim() - 1)))  # noqa: E731
        weight = self._derived_for(copies, f"{order} depthwise", build)
        conv = _CONV[len(self.kernel_size)]
        return step(copies, lambda t: conv(t, weight, None, stride, padding, dilation,
                                           groups * m))

    def _channel_stages(self, order: str) -> tuple[tuple[Tensor, int], tuple[Tensor, int]]:
        """``(weight, groups)`` of each convolution of a channel path; with ``groups > 1``
        the weight is the one every group shares."""
        r = self.rank
        f1, c1, *k1 = self.a_shape
        f2, c2, *k2 = self.b_shape
        a, b = self.a, self.b
        if order == "a_first_channels":  # C2 == 1: A to channels (F1, R), B per F1 channel
            w1 = a.transpose(0, 1).reshape(f1 * r, c1, *k1)
            return (w1, 1), (b.reshape(r, f2, *k2).transpose(0, 1).contiguous(), f1)
        if c1 == 1:  # B to channels (F2, R), A per F2 channel: outputs (F2, F1)
            w1 = b.transpose(0, 1).reshape(f2 * r, c2, *k2)
            return (w1, 1), (a.reshape(r, f1, *k1).transpose(0, 1).contiguous(), f2)
        # F2 == 1: B per input block to channels (C1, R), A over all of them
        return (b.reshape(r, c2, *k2), c1), (a.movedim(0, 2).reshape(f1, c1 * r, *k1), 1)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0,) * len(self.kernel_size):
            s += f", padding={self.padding!r}"
        if self.dilation != (1,) * len(self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        s += f", a_shape={self.a_shape}, b_shape={self.b_shape}, rank={self.rank}"
        if self.path != "auto":
            s += f", path={self.path!r}"
        return s


class KroneckerConv1d(KroneckerConvNd):
    """Kronecker ``nn.Conv1d``: a_shape is ``(F1, C1, K1)``."""

    _spatial_dims = 1


class KroneckerConv2d(KroneckerConvNd):
    """Kronecker ``nn.Conv2d``: a_shape is ``(F1, C1, K1h, K1w)``."""

    _spatial_dims = 2


class KroneckerConv3d(KroneckerConvNd):
    """Kronecker ``nn.Conv3d``: a_shape is ``(F1, C1, K1d, K1h, K1w)``."""

    _spatial_dims = 3


_BY_DIMS = {1: KroneckerConv1d, 2: KroneckerConv2d, 3: KroneckerConv3d}
