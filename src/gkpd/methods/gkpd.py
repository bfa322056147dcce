"""GKPD: each conv, linear and embedding weight as a sum of Kronecker products
(docs/design.md §1–§5).

Per-layer override: ``{"a_shape": (...)}`` (that split only), optionally with ``"rank"``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from gkpd.counting import group_split
from gkpd.decompose import b_shape_for, check_rank, rearrange
from gkpd.deprecation import renamed
from gkpd.layers import KroneckerConvNd, KroneckerEmbedding, KroneckerLinear
from gkpd.layers.base import PATH_CHOICES
from gkpd.layers.conv import (
    KroneckerConv1d,
    KroneckerConv2d,
    KroneckerConv3d,
    on_channel_path,
)
from gkpd.layers.embedding import unsupported_embedding_settings
from gkpd.methods.base import LayerContext, LayerMethod
from gkpd.methods.gkpd_search import (
    LayerShape,
    Split,
    exact_energies,
    make_split,
    split_table,
    tail_errors,
    whitened_tail_errors,
)
from gkpd.methods.lowrank import (
    data_aware_error,
    override_settings,
    positive_int,
    setting,
    whitening_covariance,
)
from gkpd.plan.candidates import Candidates
from gkpd.plan.schema import LayerPlan
from gkpd.whiten import decompose_whitened

_KRONECKER_CONV = {1: KroneckerConv1d, 2: KroneckerConv2d, 3: KroneckerConv3d}


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


class KroneckerConfig(NamedTuple):
    """One GKPD configuration of a layer: ``weight ≈ Σ_rank A_r ⊗ B_r`` with factors of
    shapes ``a_shape`` and ``b_shape``, run on ``path`` (see :mod:`gkpd.layers.base`; in a
    candidate table the stage order with fewer MACs; ``None`` for an embedding, which has
    one way to run). A plan entry holds it in its settings (:meth:`to_settings`,
    :meth:`of`)."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rank: int
    path: str | None

    order = renamed("order", "path", settable=False)

    def to_settings(self) -> dict[str, Any]:
        """The plan entry's settings for this configuration (JSON values)."""
        settings = {"a_shape": list(self.a_shape), "b_shape": list(self.b_shape),
                    "rank": int(self.rank)}
        if self.path is not None:
            settings["path"] = self.path
        return settings

    @classmethod
    def of(cls, entry: LayerPlan) -> KroneckerConfig:
        """The configuration a GKPD plan entry's settings hold (checked: a plan file may
        have been edited by hand)."""
        what = f"gkpd layer {entry.name!r}"
        shapes = []
        for key in ("a_shape", "b_shape"):
            value = setting(entry.settings, key, "gkpd", entry.name)
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(f"{what}: {key} must be a list of positive ints, got {value!r}")
            shapes.append(tuple(positive_int(v, f"{what}: {key} entry") for v in value))
        rank = positive_int(setting(entry.settings, "rank", "gkpd", entry.name), f"{what}: rank")
        path = entry.settings.get("path")
        if path is not None and path not in PATH_CHOICES:
            raise ValueError(f"{what}: path must be one of {PATH_CHOICES}, got {path!r}")
        return cls(shapes[0], shapes[1], rank, path)


class GKPD(LayerMethod):
    name = "gkpd"
    data_aware = True

    def supports(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear | nn.Embedding) or _is_conv(module):
            if not module.weight.is_floating_point():
                return f"weight dtype {module.weight.dtype} is not floating point"
            if isinstance(module, nn.Embedding):
                return unsupported_embedding_settings(
                    module.max_norm, module.scale_grad_by_freq, module.sparse
                )
            return None
        if isinstance(module, nn.modules.conv._ConvNd):
            return "transposed convolutions are not supported"
        return f"{type(module).__name__} is not a conv, linear or embedding layer"

    # ------------------------------------------------------------------ planning

    def _splits(self, ctx: LayerContext, shape: LayerShape) -> tuple[Split, ...]:
        """The splits to search: the override's, the families the first layer of this shape
        kept (``ctx.families``), or every one (the table is shared by the layer shape)."""
        budget = ctx.max_params() - ctx.bias_params
        # a dense lookup counts no MACs, so an embedding has no MAC budget to stay within
        max_macs = None if shape.kind == "embedding" else ctx.max_macs
        if "a_shape" in ctx.override:
            a = tuple(ctx.override["a_shape"])
            b = b_shape_for(shape.weight_shape, a)
            self._check_groups(ctx, a, b)
            split = make_split(shape, a, budget, max_macs)
            # the one split is the smallest, offered at rank 1 whatever the budget
            cap = max(split.cap, 1)
            if "rank" in ctx.override:
                cap = check_rank(ctx.override["rank"], a, b)
            return (split._replace(cap=cap),)
        table = split_table(shape, budget, max_macs)
        if ctx.families is None:
            return table
        return tuple(s for s in table if s.a in ctx.families)

    def _check_groups(self, ctx: LayerContext, a: tuple[int, ...], b: tuple[int, ...]) -> None:
        if _is_conv(ctx.module) and ctx.module.groups > 1:
            try:
                group_split(ctx.module.groups, a, b)
            except ValueError as error:
                raise ValueError(f"override for layer {ctx.name!r}: {error}") from error

    def candidates(self, ctx: LayerContext) -> Candidates:
        given = override_settings(ctx, self.name, ("a_shape", "rank"))
        if "rank" in given and "a_shape" not in given:
            raise ValueError(f"overrides[{ctx.name!r}] gives a rank without an a_shape")
        weight = ctx.module.weight.detach()
        splits = self._splits(ctx, LayerShape.of(ctx.module, ctx.input_shape))
        fixed_rank = "rank" in given
        whitened = ctx.select_by_output and ctx.input_covariance is not None
        total = float(weight.double().square().sum())
        spectra: dict[tuple[int, ...], tuple[np.ndarray, bool]] = {}
        if not whitened:  # splits of one spectrum: computed once, for the most ranks wanted
            wanted: dict[tuple[int, ...], tuple[tuple[int, ...], int]] = {}
            for s in splits:
                if s.spectrum not in wanted or wanted[s.spectrum][1] < s.cap:
                    wanted[s.spectrum] = (s.a, s.cap)
            spectra = {key: tail_errors(weight, a, cap, total)
                       for key, (a, cap) in wanted.items()}
        parts = []
        for s in splits:
            if whitened:
                errors = whitened_tail_errors(
                    weight, ctx.input_covariance, s.a, s.cap, ctx.damping
                )
                exact = False
            else:
                errors, exact = spectra[s.spectrum]
                errors = errors[: s.cap]
            # a weight error is the one build's factors have unless they are whitened
            exact = exact and ctx.input_covariance is None
            ranks = np.array([s.cap]) if fixed_rank else np.arange(1, s.cap + 1)
            errors = errors[-1:] if fixed_rank else errors
            parts.append(
                Candidates(
                    ranks * s.per_rank + ctx.bias_params,
                    ranks * s.macs_per_rank,
                    errors,
                    # tuple.__new__ (KroneckerConfig._make) makes thousands of configs fast
                    list(map(KroneckerConfig._make,
                             ((s.a, s.b, r, s.order) for r in ranks.tolist()))),
                    exact=np.full(len(ranks), exact),
                )
            )
        return Candidates.concatenate(parts)

    def family(self, config: KroneckerConfig) -> tuple[int, ...]:
        return config.a_shape

    def describe(self, ctx: LayerContext, config: KroneckerConfig, entry: LayerPlan) -> None:
        a, b, rank, path = config
        if _is_conv(ctx.module):  # the path the layer will run on "auto"
            path = on_channel_path(path, a, b, ctx.module.groups)
        entry.settings.update(KroneckerConfig(a, b, rank, path).to_settings())
        if ctx.input_covariance is not None:
            entry.settings.update(init="whitened", damping=float(ctx.damping))

    def exact_error(
        self, module: nn.Module, entry: LayerPlan, input_covariance: torch.Tensor | None = None
    ) -> float:
        """Relative weight error of the factors ``build`` starts from; with the layer's
        ``input_covariance`` (a data-aware entry) also records their relative output error on
        the calibration data, under the full covariance, as ``settings["output_error"]``."""
        config = KroneckerConfig.of(entry)
        cov = whitening_covariance(entry, input_covariance)
        if cov is not None:
            weight = module.weight.detach()
            factors = decompose_whitened(
                weight, cov, config.a_shape, config.b_shape, config.rank,
                damping=entry.settings["damping"],
            )
            return data_aware_error(entry, weight, factors.reconstruct(), cov)
        # the spectrum the candidate tables use, in float32 (the sums in float64)
        m = rearrange(module.weight.detach(), config.a_shape).float()
        total = float(m.double().square().sum())
        if total == 0.0:
            return 0.0
        tail = float(exact_energies(m)[config.rank:].double().sum())
        return math.sqrt(max(tail, 0.0) / total)

    # ------------------------------------------------------------------ applying

    def build(
        self, module: nn.Module, entry: LayerPlan, *, decompose: bool,
        input_covariance: torch.Tensor | None = None,
    ) -> nn.Module:
        """The Kronecker layer of ``entry``; a data-aware entry (``settings["init"] ==
        "whitened"``) decomposed with the layer's ``input_covariance``."""
        cov = whitening_covariance(entry, input_covariance) if decompose else None
        data = {} if cov is None else {"input_covariance": cov,
                                       "damping": entry.settings["damping"]}
        config = KroneckerConfig.of(entry)
        layer = build_kronecker(module, config, decompose=decompose, **data)
        if "latency_ms" in entry.settings:  # a latency plan timed this path: run it
            layer.path = config.path
        return layer


def build_kronecker(
    module: nn.Module, config: KroneckerConfig, *, decompose: bool, **data: Any
) -> nn.Module:
    """The Kronecker layer of ``config`` for the conv, linear or embedding ``module``: its
    factors decomposed from ``module``'s weight (``data``: a whitening), or freshly
    initialized when ``decompose`` is false."""
    a_shape, rank = config.a_shape, config.rank
    if isinstance(module, nn.Embedding):  # never whitened: its inputs are token ids
        if decompose:
            return KroneckerEmbedding.from_dense(module, a_shape=a_shape, rank=rank)
        w = module.weight
        return KroneckerEmbedding(
            module.num_embeddings, module.embedding_dim, module.padding_idx,
            a_shape=a_shape, rank=rank, device=w.device, dtype=w.dtype,
        )
    if isinstance(module, nn.Linear):
        if decompose:
            return KroneckerLinear.from_dense(module, a_shape=a_shape, rank=rank, **data)
        w = module.weight
        return KroneckerLinear(
            module.in_features,
            module.out_features,
            module.bias is not None,
            a_shape=a_shape,
            rank=rank,
            device=w.device,
            dtype=w.dtype,
        )
    layer_cls = _KRONECKER_CONV[len(module.kernel_size)]
    if decompose:
        return layer_cls.from_dense(module, a_shape=a_shape, rank=rank, **data)
    w = module.weight
    return layer_cls(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.bias is not None,
        module.padding_mode,
        a_shape=a_shape,
        rank=rank,
        device=w.device,
        dtype=w.dtype,
    )


def order_macs(
    module: nn.Module, input_shape: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...],
    rank: int,
) -> dict[str, int]:
    """MACs per stage order of the Kronecker layer (factor shapes ``a``, ``b``, ``rank``)
    that would replace the conv, linear or embedding ``module``, for one sample of ``input_shape``
    (batch dim first)."""
    return LayerShape.of(module, input_shape).order_macs(a, b, rank)


def is_kronecker(module: nn.Module) -> bool:
    return isinstance(module, KroneckerConvNd | KroneckerLinear | KroneckerEmbedding)
