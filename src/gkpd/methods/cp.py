"""``cp``: CP decomposition of a conv kernel (Lebedev et al. 2015).

``W (F, C, K₁ … Kₙ) ≈ Σ_r u_F[:, r] ∘ u_C[:, r] ∘ u_1[:, r] ∘ … ∘ u_n[:, r]``. The layer
becomes a 1×1 conv ``C → R``, one depthwise conv per spatial axis (kernel ``Kᵢ`` on axis ``i``
with that axis's stride, padding and dilation, 1 elsewhere; for 2-D: k×1 then 1×k), and a
1×1 conv ``R → F`` with the bias. An axis with kernel extent 1 and no padding gets no stage:
its stride moves into the first 1×1 conv. Padding of every mode is separable per axis and
commutes with the stages before it, so the stages compute exactly the conv with the
reconstructed weight. 1-D, 2-D and 3-D convs are handled alike; grouped ones are not.

Factors: TensorLy's ``parafac`` (ALS, PyTorch backend, float64, SVD start with seeded random
columns where a mode has fewer than R, at most ``iterations`` sweeps): deterministic for a
given weight, rank, ``iterations`` and ``seed``, which the plan records. Per-layer override:
``{"rank": R}``. CP's best rank-R fit is not nested in rank R+1's, so candidates fit a short
geometric grid of ranks with a few sweeps and interpolate the error in between;
``exact_error`` fits the chosen rank in full. Fits are cached by weight content, so planning
then applying fits once.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
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

ITERATIONS = 50
SEED = 0
GRID_POINTS = 5
# Candidate errors are estimates from short fits (the chosen rank is then fitted in full):
# CP fits dominate planning time, and the ranking of ranks settles within a few sweeps.
ESTIMATE_ITERATIONS = 12
_TOL = 1e-10  # stop once an ALS sweep changes the relative error by less
_CACHE: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 64


# ----------------------------------------------------------------------------- fit


def cp_als(
    x: torch.Tensor, rank: int, iterations: int = ITERATIONS, seed: int = SEED
) -> list[torch.Tensor]:
    """CP factors ``[(dim_m, rank)]`` of ``x`` (float64) by TensorLy's ``parafac`` (ALS from
    an SVD start; columns a mode lacks drawn with ``seed``), column scales balanced over
    modes."""
    x = x.detach().double()
    with pytorch_backend("cp"):
        from tensorly.decomposition import parafac

        weights, factors = parafac(
            x, rank, n_iter_max=iterations, init="svd", tol=_TOL, random_state=seed
        )
    factors = [f.clone() for f in factors]
    factors[0] = factors[0] * weights
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (modes, R)
    scale = norms.prod(0).pow(1.0 / x.ndim)
    return [f / n.clamp_min(1e-300) * scale for f, n in zip(factors, norms, strict=True)]


def reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    letters = "abcdefgh"[: len(factors)]
    return torch.einsum(",".join(f"{c}z" for c in letters) + "->" + letters, *factors)


def _fit(x: torch.Tensor, rank: int, iterations: int, seed: int) -> list[torch.Tensor]:
    data = x.detach().double().cpu().contiguous()
    digest = hashlib.sha1(data.numpy().tobytes()).hexdigest()
    key = (digest, tuple(data.shape), rank, iterations, seed)
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = cp_als(data, rank, iterations, seed)
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return [f.to(x.device) for f in _CACHE[key]]


# ----------------------------------------------------------------------------- geometry


def _stage_axes(module: nn.Module) -> list[int]:
    """Spatial axes that get a depthwise stage: kernel extent > 1, or padded."""
    axes = []
    for i, k in enumerate(module.kernel_size):
        padded = not isinstance(module.padding, str) and module.padding[i] != 0
        if k > 1 or padded:
            axes.append(i)
    return axes


def _tensor(module: nn.Module) -> torch.Tensor:
    """The kernel as ``(F, C, K_i for stage axes)``: unstaged axes have extent 1."""
    w = module.weight
    axes = _stage_axes(module)
    return w.reshape(w.shape[0], w.shape[1], *(module.kernel_size[i] for i in axes))


class CP(LayerMethod):
    name = "cp"
    # ResNet-32 5x, 3 epochs x 60k distilled: 93.71/93.76% at lr 0.001 against 88.35% at the
    # 0.01 that suits the other methods (its first epoch's loss stayed at 2.6); CP layers are
    # known to be delicate to fine-tune (Lebedev et al. 2015).
    finetune_lr = 0.001

    def check_available(self) -> None:
        require_tensorly(self.name)

    def supports(self, module: nn.Module) -> str | None:
        reason = layer_reason(module, self.name, linear=False, grouped=False)
        if reason:
            return reason
        f, c, *k = module.weight.shape
        smallest = c + sum(k) + f
        if smallest >= module.weight.numel():
            return (
                f"rank 1 has {smallest} weights, no fewer than the dense layer's "
                f"{module.weight.numel()}"
            )
        return None

    # ------------------------------------------------------------------ planning

    def _per_rank(self, ctx: LayerContext) -> tuple[int, int]:
        """``(params, MACs)`` per unit of rank, stage by stage at the planner's input size."""
        module = ctx.module
        f, c = module.weight.shape[:2]
        spatial, out, _ = conv_geometry(module, ctx.input_shape)
        axes = _stage_axes(module)
        size = [
            o if i not in axes else s for i, (s, o) in enumerate(zip(spatial, out, strict=True))
        ]
        params, macs = c + f, c * math.prod(size)
        for i in axes:
            size[i] = out[i]
            params += module.kernel_size[i]
            macs += module.kernel_size[i] * math.prod(size)
        return params, macs + f * math.prod(out)

    def candidates(self, ctx: LayerContext) -> Candidates:
        module = ctx.module
        wanted = override_settings(ctx, self.name, ("rank",)).get("rank")
        if wanted is not None:
            wanted = positive_int(wanted, f"overrides[{ctx.name!r}]['rank']")
        per_params, per_macs = self._per_rank(ctx)
        bias = ctx.bias_params
        # no rank beyond the one that is as large as the dense layer is of interest
        top = max(1, (ctx.dense_params - bias) // per_params, wanted or 0)
        ranks = np.arange(1, top + 1)
        params, macs = ranks * per_params + bias, ranks * per_macs
        keep = restrict(ctx, params, macs, ranks.tolist(), wanted, self.name)
        if not len(keep):
            return Candidates.empty()
        ranks = ranks[keep]
        grid = np.unique(np.round(np.geomspace(ranks[0], ranks[-1], GRID_POINTS)).astype(int))
        x = _tensor(module)
        fitted = np.array(
            [
                relative_error(x, reconstruct(_fit(x, int(r), ESTIMATE_ITERATIONS, SEED)))
                for r in grid
            ]
        )
        fitted = np.minimum.accumulate(fitted)  # a larger rank can always do as well
        errors = np.interp(ranks, grid, fitted)
        return Candidates(params[keep], macs[keep], errors, [int(r) for r in ranks])

    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        entry.settings = {"rank": int(config), "iterations": ITERATIONS, "seed": SEED}

    def _settings(self, entry: LayerPlan) -> tuple[int, int, int]:
        rank = positive_int(
            setting(entry.settings, "rank", self.name, entry.name),
            f"cp rank of layer {entry.name!r}",
        )
        iterations = entry.settings.get("iterations", ITERATIONS)
        seed = entry.settings.get("seed", SEED)
        for key, value in (("iterations", iterations), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"cp {key} of layer {entry.name!r} must be an int >= 0, got {value!r}"
                )
        return rank, iterations, seed

    def exact_error(self, module: nn.Module, entry: LayerPlan) -> float:
        x = _tensor(module)
        return relative_error(x, reconstruct(_fit(x, *self._settings(entry))))

    # ------------------------------------------------------------------ applying

    def build(self, module: nn.Module, entry: LayerPlan, *, decompose: bool) -> nn.Module:
        rank, iterations, seed = self._settings(entry)
        n = len(module.kernel_size)
        axes = _stage_axes(module)
        point = (1,) * n
        first_stride = tuple(1 if i in axes else s for i, s in enumerate(module.stride))
        stages = [conv_like(module, module.in_channels, rank, point, stride=first_stride)]
        for i in axes:

            def on_axis(value, other, axis=i):
                return tuple(value[axis] if j == axis else other for j in range(n))

            padding = module.padding
            if not isinstance(padding, str):
                padding = on_axis(padding, 0)
            stages.append(
                conv_like(
                    module,
                    rank,
                    rank,
                    on_axis(module.kernel_size, 1),
                    stride=on_axis(module.stride, 1),
                    padding=padding,
                    dilation=on_axis(module.dilation, 1),
                    groups=rank,
                    padding_mode=module.padding_mode,
                )
            )
        stages.append(
            conv_like(module, rank, module.out_channels, point, bias=module.bias is not None)
        )
        if decompose:
            u_f, u_c, *u_k = _fit(_tensor(module), rank, iterations, seed)
            load(stages[0], u_c.T)
            for stage, u in zip(stages[1:-1], u_k, strict=True):
                load(stage, u.T)
            load(stages[-1], u_f, None if module.bias is None else module.bias.detach())
        return Stages(*stages, groups=module.groups)
