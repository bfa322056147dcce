"""``tucker``: Tucker-2 on the channel modes of a conv kernel (Kim et al. 2016).

``W (F, C, *K) ≈ G ×₀ U_out ×₁ U_in`` with ``U_in (C, r_in)``, ``U_out (F, r_out)`` orthonormal
and the core ``G (r_out, r_in, *K)``. The layer becomes a 1×1 conv ``C → r_in`` (no bias), the
core conv ``r_in → r_out`` with the original kernel, stride, padding, dilation and padding
mode, and a 1×1 conv ``r_out → F`` with the bias. Padding after a pointwise, bias-free conv
equals the pointwise conv of the padded input for every padding mode, so the three stages
compute exactly the conv with the reconstructed weight.

Factors: TensorLy's ``partial_tucker`` (HOSVD refined by HOOI, PyTorch backend, float64).
Candidate errors for every ``(r_in, r_out)`` pair come from one plain-torch HOSVD (the energy
of the rotated kernel, cumulated over both channel modes); they bound HOOI's error from above,
and ``exact_error`` reports HOOI's. Per-layer override: ``{"ranks": [r_in, r_out]}``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gkpd.methods._tensorly import pytorch_backend, require_tensorly
from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.lowrank import (
    Stages,
    conv_geometry,
    conv_like,
    layer_reason,
    load,
    override_settings,
    positive_int,
    relative_error,
    restrict,
    setting,
)
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan

HOOI_ITERATIONS = 10


def hosvd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_in (C, C'), rotated (F', C', *K), u_out (F, F'))`` in float64: the leading left
    singular vectors of both channel unfoldings and the kernel rotated by them, whose corner
    ``[:r_out, :r_in]`` is the HOSVD core of those ranks."""
    w = weight.detach().double()

    def leading(mode: int) -> torch.Tensor:
        unfolded = w.movedim(mode, 0).reshape(w.shape[mode], -1)
        return torch.linalg.svd(unfolded, full_matrices=False).U

    u_out, u_in = leading(0), leading(1)
    return u_in, torch.einsum("fc...,fo,ci->oi...", w, u_out, u_in), u_out


def corner_energies(rotated: torch.Tensor) -> np.ndarray:
    """``captured[r_out - 1, r_in - 1]``: ``‖G‖²`` of the HOSVD core of every pair of ranks,
    the energy of the corners of :func:`hosvd`'s rotated kernel (the rest of ``‖W‖²`` is the
    error of those projections: they are orthonormal)."""
    energy = rotated.square().reshape(*rotated.shape[:2], -1).sum(-1)
    return energy.cumsum(0).cumsum(1).cpu().numpy()


def _max_ranks(weight_shape) -> tuple[int, int]:
    """Largest useful ``(r_in, r_out)``: beyond them the unfoldings have no more rank."""
    f, c = weight_shape[0], weight_shape[1]
    k = math.prod(weight_shape[2:])
    return min(c, f * k), min(f, c * k)


def _check_ranks(weight_shape, r_in: int, r_out: int) -> None:
    """A core ``(r_out, r_in, *K)`` has rank at most ``r_out·∏K`` on its input mode (and
    ``r_in·∏K`` on its output mode); ranks beyond that are void, and HOOI cannot fill them."""
    kk = math.prod(weight_shape[2:])
    max_in, max_out = _max_ranks(weight_shape)
    if not (1 <= r_in <= min(max_in, r_out * kk) and 1 <= r_out <= min(max_out, r_in * kk)):
        raise ValueError(
            f"tucker ranks (r_in={r_in}, r_out={r_out}) do not fit weight shape "
            f"{tuple(weight_shape)}: expected 1 <= r_in <= min({max_in}, r_out·{kk}) and "
            f"1 <= r_out <= min({max_out}, r_in·{kk})"
        )


def parse_ranks(weight_shape, ranks: Any, what: str) -> tuple[int, int]:
    """``ranks`` (a plan's or an override's ``[r_in, r_out]``) checked against
    ``weight_shape``; errors start with ``what``."""
    if not isinstance(ranks, list | tuple) or len(ranks) != 2:
        raise ValueError(f"{what} must be [r_in, r_out], got {ranks!r}")
    r_in, r_out = (positive_int(r, what) for r in ranks)
    try:
        _check_ranks(weight_shape, r_in, r_out)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
    return r_in, r_out


def tucker2(
    weight: torch.Tensor, r_in: int, r_out: int, iterations: int = HOOI_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u_in (C, r_in), core (r_out, r_in, *K), u_out (F, r_out))`` in float64: TensorLy's
    ``partial_tucker`` on the two channel modes (HOSVD start, ``iterations`` HOOI sweeps)."""
    w = weight.detach().double()
    _check_ranks(w.shape, r_in, r_out)
    with pytorch_backend("tucker"):
        from tensorly.decomposition import partial_tucker

        (core, (u_out, u_in)), _ = partial_tucker(
            w, rank=[r_out, r_in], modes=[0, 1], n_iter_max=iterations, init="svd", tol=0
        )
    return u_in, core, u_out


def reconstruct(u_in: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oi...,fo,ci->fc...", core, u_out, u_in)


class Tucker(LayerMethod):
    name = "tucker"

    def check_available(self) -> None:
        require_tensorly(self.name)

    def supports(self, module: nn.Module) -> str | None:
        reason = layer_reason(module, self.name, linear=False, grouped=False)
        if reason:
            return reason
        f, c, *k = module.weight.shape
        smallest = c + math.prod(k) + f
        if smallest >= module.weight.numel():
            return (
                f"ranks (1, 1) have {smallest} weights, no fewer than the dense layer's "
                f"{module.weight.numel()}"
            )
        return None

    # ------------------------------------------------------------------ planning

    def candidates(self, ctx: LayerContext) -> Candidates:
        module = ctx.module
        wanted = override_settings(ctx, self.name, ("ranks",)).get("ranks")
        if wanted is not None:
            wanted = parse_ranks(ctx.module.weight.shape, wanted,
                                 f"overrides[{ctx.name!r}]['ranks']")
        w = module.weight.detach().double()
        f, c, *k = w.shape
        kk = math.prod(k)
        max_in, max_out = _max_ranks(w.shape)
        r_out, r_in = np.meshgrid(
            np.arange(1, max_out + 1), np.arange(1, max_in + 1), indexing="ij"
        )
        r_out, r_in = r_out.ravel(), r_in.ravel()
        bias = ctx.bias_params
        useful = (r_in <= r_out * kk) & (r_out <= r_in * kk)
        r_out, r_in = r_out[useful], r_in[useful]
        params = c * r_in + r_out * r_in * kk + f * r_out + bias
        spatial, out, _ = conv_geometry(module, ctx.input_shape)
        o = math.prod(out)
        macs = c * r_in * math.prod(spatial) + r_out * r_in * kk * o + f * r_out * o
        configs = list(zip(r_in.tolist(), r_out.tolist(), strict=True))
        keep = restrict(ctx, params, macs, configs, wanted, self.name)
        if not len(keep):
            return Candidates.empty()
        captured = corner_energies(hosvd(w)[1])[r_out[keep] - 1, r_in[keep] - 1]
        total = float(w.square().sum())
        errors = (
            np.sqrt(np.clip(total - captured, 0.0, None) / total)
            if total
            else np.zeros_like(captured)
        )
        configs = [(int(r_in[i]), int(r_out[i])) for i in keep]
        return Candidates(params[keep], macs[keep], errors, configs)

    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        r_in, r_out = config
        entry.settings = {"ranks": [int(r_in), int(r_out)], "iterations": HOOI_ITERATIONS}

    def _ranks(self, module: nn.Module, entry: LayerPlan) -> tuple[int, int, int]:
        ranks = setting(entry.settings, "ranks", self.name, entry.name)
        r_in, r_out = parse_ranks(module.weight.shape, ranks,
                                  f"tucker ranks of layer {entry.name!r}")
        iterations = entry.settings.get("iterations", HOOI_ITERATIONS)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(
                f"tucker iterations of layer {entry.name!r} must be an int >= 0, got {iterations!r}"
            )
        return r_in, r_out, iterations

    def exact_error(self, module: nn.Module, entry: LayerPlan) -> float:
        factors = tucker2(module.weight, *self._ranks(module, entry))
        return relative_error(module.weight, reconstruct(*factors))

    # ------------------------------------------------------------------ applying

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        r_in, r_out, iterations = self._ranks(module, entry)
        n = len(module.kernel_size)
        point = (1,) * n
        first = conv_like(module, module.in_channels, r_in, point)
        core = conv_like(
            module,
            r_in,
            r_out,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            padding_mode=module.padding_mode,
        )
        last = conv_like(module, r_out, module.out_channels, point, bias=module.bias is not None)
        if decompose:
            u_in, g, u_out = tucker2(module.weight, r_in, r_out, iterations)
            load(first, u_in.T)
            load(core, g)
            load(last, u_out, None if module.bias is None else module.bias.detach())
        return Stages(first, core, last)
