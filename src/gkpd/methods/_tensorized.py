"""What ``tensor_train`` and ``tensor_ring`` share: the tensorization of a weight, the layer
that holds the cores, and the plan/apply logic around a method's own core shapes.

Tensorization (Novikov et al. 2015 for linear layers, Garipov et al. 2016 for convolutions):
the input channels ``C/g = ∏ c_i`` and the output channels ``F = ∏ f_i`` are split into ``d``
balanced factors each (``d = 2`` when the kernel has a spatial extent, else 3), and the weight
``(F, C/g, *K)`` becomes the tensor ``(∏K, c_1·f_1, …, c_d·f_d)`` (no spatial mode when
``∏K = 1``): mode ``i`` pairs input factor ``c_i`` with output factor ``f_i``. The cores are
``G_k (r_k, n_k, r_{k+1})`` and the weight is ``trace(G_0[:, i_0, :] ⋯ G_{m-1}[:, i_{m-1}, :])``,
with ``r_0 = r_m = 1`` for a train and ``r_0 = r_m = R`` for a ring.

The layer rebuilds the dense weight from its cores on every call and runs ``F.conv{n}d`` /
``F.linear`` with every option of the original layer (stride, padding, string padding,
dilation, groups, padding mode, bias): exact, and how such layers are usually run. Its MACs
(``macs``, which :func:`gkpd.counting.count_model` counts and the planner budgets) are the dense
layer's at the input size: rebuilding the weight is per call, not per sample, and is not
counted; ``reconstruction_macs`` gives its cost, the contraction of the cores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gkpd.counting import conv_macs, linear_macs, resolve_padding
from gkpd.layers.base import ReconstructedWeight, refuse_script
from gkpd.methods._tensorly import require_tensorly
from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.lowrank import (
    is_conv,
    layer_reason,
    override_settings,
    positive_int,
    relative_error,
    restrict,
    setting,
)
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
Shapes = list[tuple[int, int, int]]


# ----------------------------------------------------------------------------- tensorization


def balanced_factors(n: int, d: int) -> list[int]:
    """``n`` as ``d`` factors as equal as its prime factors allow, largest first."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    buckets = [1] * d
    for prime in sorted(primes, reverse=True):
        buckets[buckets.index(min(buckets))] *= prime
    return sorted(buckets, reverse=True)


def default_modes(weight_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """``(in_modes, out_modes)`` of a weight ``(F, C/g, *K)`` or ``(out, in)``; the output
    factors rise where the input ones fall, so the paired modes are alike in size."""
    kk = math.prod(weight_shape[2:])
    d = 2 if kk > 1 else 3
    return balanced_factors(weight_shape[1], d), balanced_factors(weight_shape[0], d)[::-1]


def tensor_modes(weight_shape: Sequence[int], in_modes, out_modes) -> list[int]:
    kk = math.prod(weight_shape[2:])
    pairs = [c * f for c, f in zip(in_modes, out_modes, strict=True)]
    return [kk, *pairs] if kk > 1 else pairs


def _axes(d: int) -> list[int]:
    """Permutation of ``(f_1…f_d, c_1…c_d, ∏K)`` into ``(∏K, c_1, f_1, …, c_d, f_d)``."""
    return [2 * d] + [a for i in range(d) for a in (d + i, i)]


def to_tensor(weight: torch.Tensor, in_modes, out_modes) -> torch.Tensor:
    d = len(in_modes)
    kk = math.prod(weight.shape[2:])
    t = weight.reshape(*out_modes, *in_modes, kk).permute(_axes(d))
    return t.reshape(tensor_modes(weight.shape, in_modes, out_modes))


def from_tensor(t: torch.Tensor, weight_shape, in_modes, out_modes) -> torch.Tensor:
    d = len(in_modes)
    kk = math.prod(weight_shape[2:])
    split = [kk] + [m for i in range(d) for m in (in_modes[i], out_modes[i])]
    inverse = np.argsort(_axes(d)).tolist()
    return t.reshape(split).permute(inverse).reshape(tuple(weight_shape))


def contract(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor ``(n_0, …, n_{m-1})`` of a train or ring of cores ``(r_k, n_k, r_{k+1})``."""
    t = cores[0]
    for g in cores[1:]:
        t = torch.einsum("anb,bmc->anmc", t, g).reshape(t.shape[0], -1, g.shape[2])
    full = t.diagonal(dim1=0, dim2=2).sum(-1)
    return full.reshape([g.shape[1] for g in cores])


# ----------------------------------------------------------------------------- layer


class TensorizedLayer(ReconstructedWeight, nn.Module):
    """A conv/linear layer whose weight is a train or ring of cores (``self.cores``)."""

    def __init__(
        self, dense: nn.Module, core_shapes: Shapes, in_modes, out_modes, rank: int
    ) -> None:
        super().__init__()
        w = dense.weight
        self.weight_shape = tuple(w.shape)
        self.in_modes, self.out_modes, self.rank = list(in_modes), list(out_modes), rank
        self.conv_dims = len(dense.kernel_size) if is_conv(dense) else 0
        if self.conv_dims:
            for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                        "dilation", "groups", "padding_mode"):
                setattr(self, key, getattr(dense, key))
        else:
            self.in_features, self.out_features = dense.in_features, dense.out_features
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(s, device=w.device, dtype=w.dtype)) for s in core_shapes
        )
        bias = None if dense.bias is None else nn.Parameter(torch.empty_like(dense.bias))
        self.register_parameter("bias", bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Cores drawn so the rebuilt weight has the variance of torch's default init."""
        fan_in = math.prod(self.weight_shape[1:])
        paths = math.prod(g.shape[0] for g in self.cores)  # rank products summed per entry
        std = (1.0 / (3.0 * fan_in * paths)) ** (0.5 / len(self.cores))
        for g in self.cores:
            g.normal_(0.0, std)
        if self.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            self.bias.uniform_(-bound, bound)

    def reconstruct_weight(self) -> torch.Tensor:
        return from_tensor(contract(list(self.cores)), self.weight_shape, self.in_modes,
                           self.out_modes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.reconstruct_weight()
        if not self.conv_dims:
            return F.linear(x, w, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            pads = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
            x = F.pad(x, [p for pair in reversed(pads) for p in pair], mode=self.padding_mode)
            padding = 0
        conv = _CONV_FN[self.conv_dims]
        return conv(x, w, self.bias, self.stride, padding, self.dilation, self.groups)

    def __prepare_scriptable__(self):
        refuse_script(self, "its forward rebuilds the weight from its cores in Python")

    def reconstruction_macs(self) -> int:
        """MACs of rebuilding the weight from the cores (``contract``), once per call and
        whatever the batch: ``Σ_k r_0·(n_0⋯n_{k-1})·r_k·n_k·r_{k+1}`` over the cores after the
        first. Not part of ``macs``."""
        total, (r0, rows, _) = 0, self.cores[0].shape
        for g in list(self.cores)[1:]:
            rk, nk, rk1 = g.shape
            total += r0 * rows * rk * nk * rk1
            rows *= nk
        return total

    def macs(self, input_shape: Sequence[int]) -> int:
        """MACs of one call on ``input_shape``: the dense conv/linear op with the rebuilt
        weight (the rebuild, ``reconstruction_macs``, is not included)."""
        shape = tuple(int(s) for s in input_shape)
        if not self.conv_dims:
            return linear_macs(self.in_features, self.out_features, math.prod(shape[:-1]))
        n = self.conv_dims
        return conv_macs(shape[-n:], self.in_channels, self.out_channels, self.kernel_size,
                         self.stride, self.padding, self.dilation, self.groups,
                         batch=shape[0] if len(shape) == n + 2 else 1)

    def extra_repr(self) -> str:
        shapes = ", ".join("×".join(map(str, g.shape)) for g in self.cores)
        return f"weight_shape={self.weight_shape}, rank={self.rank}, cores=[{shapes}]"


# ----------------------------------------------------------------------------- method


class TensorizedMethod(LayerMethod):
    """Plan/apply for a method defined by its ``core_shapes`` and its ``factorize``."""

    name: str
    layer_cls: type[TensorizedLayer]

    def check_available(self) -> None:
        require_tensorly(self.name)

    def core_shapes(self, modes: list[int], rank: int) -> Shapes | None:
        """Core shapes of uniform rank ``rank`` (``None``: the rank does not fit)."""
        raise NotImplementedError

    def max_rank(self, modes: list[int]) -> int:
        raise NotImplementedError

    def factorize(self, tensor: torch.Tensor, shapes: Shapes) -> list[torch.Tensor]:
        raise NotImplementedError

    def supports(self, module: nn.Module) -> str | None:
        reason = layer_reason(module, self.name)
        if reason:
            return reason
        in_modes, out_modes = default_modes(module.weight.shape)
        shapes = self.core_shapes(tensor_modes(module.weight.shape, in_modes, out_modes), 1)
        smallest = sum(math.prod(s) for s in shapes)
        if smallest >= module.weight.numel():
            return (
                f"rank 1 has {smallest} weights, no fewer than the dense layer's "
                f"{module.weight.numel()}"
            )
        return None

    def _decompose(self, weight, in_modes, out_modes, rank) -> tuple[list[torch.Tensor], Any]:
        """``(cores, tensor)`` of ``weight`` (float64)."""
        t = to_tensor(weight.detach().double(), in_modes, out_modes)
        shapes = self.core_shapes(list(t.shape), rank)
        cores = [c.contiguous() for c in self.factorize(t, shapes)]
        got = [tuple(c.shape) for c in cores]
        if got != [tuple(s) for s in shapes]:
            raise RuntimeError(f"{self.name}: TensorLy returned cores {got}, expected {shapes}")
        return cores, t

    def _error(self, weight, in_modes, out_modes, rank) -> float:
        cores, t = self._decompose(weight, in_modes, out_modes, rank)
        return relative_error(t, contract(cores))

    # ------------------------------------------------------------------ planning

    def candidates(self, ctx: LayerContext) -> Candidates:
        module = ctx.module
        weight_shape = tuple(module.weight.shape)
        in_modes, out_modes = default_modes(weight_shape)
        modes = tensor_modes(weight_shape, in_modes, out_modes)
        top = self.max_rank(modes)
        wanted = override_settings(ctx, self.name, ("rank",)).get("rank")
        if wanted is not None:
            wanted = positive_int(wanted, f"overrides[{ctx.name!r}]['rank']", top)
        ranks = np.arange(1, top + 1)
        params = np.array([sum(math.prod(s) for s in self.core_shapes(modes, int(r)))
                           for r in ranks]) + ctx.bias_params
        macs = np.full(len(ranks), ctx.dense_macs, dtype=np.int64)
        keep = restrict(ctx, params, macs, ranks.tolist(), wanted, self.name)
        if not len(keep):
            return Candidates.empty()
        errors = np.array(
            [self._error(module.weight, in_modes, out_modes, int(ranks[i])) for i in keep]
        )
        configs = [(int(ranks[i]), tuple(in_modes), tuple(out_modes)) for i in keep]
        return Candidates(params[keep], macs[keep], errors, configs)

    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        rank, in_modes, out_modes = config
        entry.settings = {"rank": int(rank), "in_modes": list(in_modes),
                          "out_modes": list(out_modes)}

    def _settings(self, module: nn.Module, entry: LayerPlan):
        shape = tuple(module.weight.shape)
        rank = setting(entry.settings, "rank", self.name, entry.name)
        default_in, default_out = default_modes(shape)
        in_modes = entry.settings.get("in_modes", default_in)
        out_modes = entry.settings.get("out_modes", default_out)
        for key, modes, size in (("in_modes", in_modes, shape[1]),
                                 ("out_modes", out_modes, shape[0])):
            if (not isinstance(modes, list | tuple) or not modes
                    or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in modes)
                    or math.prod(modes) != size or len(modes) != len(default_in)):
                raise ValueError(
                    f"{self.name} {key} of layer {entry.name!r} must be {len(default_in)} "
                    f"positive ints whose product is {size}, got {modes!r}"
                )
        modes = tensor_modes(shape, in_modes, out_modes)
        rank = positive_int(rank, f"{self.name} rank of layer {entry.name!r}",
                            self.max_rank(modes))
        return rank, list(in_modes), list(out_modes), self.core_shapes(modes, rank)

    def exact_error(self, module: nn.Module, entry: LayerPlan) -> float:
        rank, in_modes, out_modes, _ = self._settings(module, entry)
        return self._error(module.weight, in_modes, out_modes, rank)

    # ------------------------------------------------------------------ applying

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        rank, in_modes, out_modes, shapes = self._settings(module, entry)
        layer = self.layer_cls(module, shapes, in_modes, out_modes, rank)
        if decompose:
            cores, _ = self._decompose(module.weight, in_modes, out_modes, rank)
            with torch.no_grad():
                for param, core in zip(layer.cores, cores, strict=True):
                    param.copy_(core)
                if module.bias is not None:
                    layer.bias.copy_(module.bias.detach())
        return layer
