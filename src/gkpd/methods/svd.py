"""``svd``: plain low rank of the flattened weight.

A conv weight ``(F, C/g, *K)`` is flattened per group to ``(F/g, C/g·∏K)`` and truncated to
rank ``r`` (a batched SVD over the groups; per-layer override ``{"rank": r}``). The layer
becomes a conv ``C → g·r`` with the original kernel, stride, padding, dilation and padding
mode, then a 1×1 conv ``g·r → F`` with the bias (both with ``groups=g``). A linear layer
becomes ``Linear(in → r, no bias)`` then ``Linear(r → out)``. Each factor carries ``√σ``.
The error of every rank comes from one SVD.

With calibration data (``gkpd.plan(..., method="svd", calibration=...)``) the truncation is
activation-aware: the SVD of the weight whitened by the damped second moment of the layer's
input vectors (:func:`gkpd.whiten.whitened_svd`), so that each rank keeps the most of the
layer's *output* on that data — the data-aware counterpart of GKPD's whitened factors, so that
the two are compared on equal terms.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.lowrank import (
    Stages,
    conv_geometry,
    conv_like,
    data_aware_error,
    is_conv,
    layer_reason,
    linear_like,
    linear_rows,
    load,
    override_settings,
    positive_int,
    restrict,
    setting,
    whitening_covariance,
)
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan
from gkpd.whiten import whitened_svd


def _groups(module: nn.Module) -> int:
    return module.groups if is_conv(module) else 1


def _grouped_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``(g, F/g, C/g·∏K)`` in float64."""
    w = module.weight.detach().double()
    g = _groups(module)
    return w.reshape(g, w.shape[0] // g, -1)


def _full_rank(module: nn.Module) -> int:
    w = module.weight
    g = _groups(module)
    return min(w.shape[0] // g, w[0].numel())


def _params_per_rank(module: nn.Module) -> int:
    """Parameters per unit of rank: ``C·∏K + F`` (conv) or ``in + out`` (linear)."""
    w = module.weight
    return _groups(module) * w[0].numel() + w.shape[0]


def _bias(module: nn.Module) -> int:
    return 0 if module.bias is None else module.bias.numel()


def _relative_tail(s2: torch.Tensor) -> np.ndarray:
    """Relative error of every rank from the squared singular values ``(g, k)``."""
    per_rank = s2.sum(0).cpu().numpy()
    # summed from the smallest value, so that the tail of the full rank is exactly 0 and a
    # small tail is not the difference of two large sums
    tails = np.append(np.cumsum(per_rank[::-1])[::-1][1:], 0.0)
    total = float(per_rank.sum())
    return np.sqrt(tails / total) if total else 0 * tails


class SVD(LayerMethod):
    name = "svd"
    data_aware = True

    def supports(self, module: nn.Module) -> str | None:
        reason = layer_reason(module, self.name)
        if reason:
            return reason
        smallest = _params_per_rank(module)
        if smallest >= module.weight.numel():
            return (
                f"rank 1 has {smallest} weights, no fewer than the dense layer's "
                f"{module.weight.numel()}"
            )
        return None

    # ------------------------------------------------------------------ planning

    def _macs_per_rank(self, ctx: LayerContext) -> int:
        module = ctx.module
        if isinstance(module, nn.Linear):
            return linear_rows(ctx.input_shape) * _params_per_rank(module)
        _, out, _ = conv_geometry(module, ctx.input_shape)
        return math.prod(out) * _params_per_rank(module)

    def candidates(self, ctx: LayerContext) -> Candidates:
        module = ctx.module
        wanted = override_settings(ctx, self.name, ("rank",)).get("rank")
        if wanted is not None:
            wanted = positive_int(wanted, f"overrides[{ctx.name!r}]['rank']", _full_rank(module))
        ranks = np.arange(1, _full_rank(module) + 1)
        params = ranks * _params_per_rank(module) + _bias(module)
        macs = ranks * self._macs_per_rank(ctx)
        keep = restrict(ctx, params, macs, ranks.tolist(), wanted, self.name)
        if not len(keep):
            return Candidates.empty()
        if ctx.select_by_output and ctx.input_covariance is not None:
            _, s, _ = whitened_svd(_grouped_matrix(module), ctx.input_covariance,
                                   damping=ctx.damping)
        else:
            s = torch.linalg.svdvals(_grouped_matrix(module))
        errors = _relative_tail(s.square())
        # the weight errors are those of the SVD that build truncates (no second SVD per
        # layer) unless build whitens it
        exact = ctx.input_covariance is None
        return Candidates(params[keep], macs[keep], errors[keep], [int(r) for r in ranks[keep]],
                          exact=np.full(len(keep), exact))

    def describe(self, ctx: LayerContext, config: Any, entry: LayerPlan) -> None:
        entry.settings = {"rank": int(config)}
        if ctx.input_covariance is not None:
            entry.settings.update(init="whitened", damping=float(ctx.damping))

    def _rank(self, module: nn.Module, entry: LayerPlan) -> int:
        rank = setting(entry.settings, "rank", self.name, entry.name)
        return positive_int(rank, f"svd rank of layer {entry.name!r}", _full_rank(module))

    def _factors(
        self, module: nn.Module, entry: LayerPlan, input_covariance: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first (g, r, D), second (g, F/g, r))`` in float64, each carrying ``√σ``; whitened
        when the entry says so."""
        rank = self._rank(module, entry)
        cov = whitening_covariance(entry, input_covariance)
        if cov is not None:
            u, s, vh = whitened_svd(_grouped_matrix(module), cov,
                                    damping=entry.settings["damping"])
        else:
            u, s, vh = torch.linalg.svd(_grouped_matrix(module), full_matrices=False)
        root = s[:, :rank].sqrt()
        return root.unsqueeze(-1) * vh[:, :rank], u[:, :, :rank] * root.unsqueeze(1)

    def exact_error(
        self, module: nn.Module, entry: LayerPlan, input_covariance: torch.Tensor | None = None
    ) -> float:
        """Relative weight error of the factors ``build`` starts from; a data-aware entry
        also records their relative output error on the calibration data as
        ``settings["output_error"]``."""
        cov = whitening_covariance(entry, input_covariance)
        if cov is not None:
            first, second = self._factors(module, entry, cov)
            return data_aware_error(entry, module.weight.detach().to("cpu", torch.float64),
                                    second @ first, cov)
        rank = self._rank(module, entry)
        return float(_relative_tail(torch.linalg.svdvals(_grouped_matrix(module)).square())
                     [rank - 1])

    # ------------------------------------------------------------------ applying

    def build(
        self, module: nn.Module, entry: LayerPlan, *, decompose: bool,
        input_covariance: torch.Tensor | None = None,
    ) -> nn.Module:
        """The two-stage layer of ``entry``; a data-aware entry (``settings["init"] ==
        "whitened"``) truncated in the whitening of the layer's ``input_covariance``."""
        rank = self._rank(module, entry)
        has_bias = module.bias is not None
        if isinstance(module, nn.Linear):
            first = linear_like(module, module.in_features, rank, bias=False)
            second = linear_like(module, rank, module.out_features, bias=has_bias)
        else:
            g, n = module.groups, len(module.kernel_size)
            first = conv_like(
                module,
                module.in_channels,
                g * rank,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=g,
                padding_mode=module.padding_mode,
            )
            second = conv_like(
                module, g * rank, module.out_channels, (1,) * n, groups=g, bias=has_bias
            )
        if decompose:
            a, b = self._factors(module, entry, input_covariance)
            # first: (g·r, C/g·∏K); second: per group (F/g, r), stacked to (F, r)
            load(first, a.reshape(-1, a.shape[-1]))
            load(second, b.reshape(-1, rank),
                 None if module.bias is None else module.bias.detach())
        return Stages(first, second, groups=getattr(module, "groups", 1))
