"""Attention whose projections are modules, so they can be planned and compressed.

``nn.MultiheadAttention`` keeps its query/key/value projections in one packed parameter
(``in_proj_weight``) and reads ``out_proj.weight`` directly, so none of its projections is
ever called as a layer. :class:`UnpackedMultiheadAttention` computes the same function with
four ``nn.Linear`` modules (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) that are called,
so a compression method can replace any of them.

torch's transformer layers also have a fused inference path that reads their children's
weights (``linear1.weight``, ``self_attn.in_proj_weight``, ...). A compressed child has no
such weight, and running the fused kernel on a reconstructed dense one would undo the
compression at run time; :func:`unfuse` makes those parents run through their children
instead (``UnfusedTransformerEncoderLayer``; ``nn.TransformerEncoder`` without its
nested-tensor path). :func:`gkpd.apply_` does both where a plan needs it.

:func:`with_unpacked_layers` prepares a model for planning: it unpacks, on a copy, every
module of :data:`UNPACKED` (the attention, and the recurrent layers and cells of
:mod:`gkpd.layers.recurrent` and :mod:`gkpd.layers.recurrent_cells`, whose gate weights are
parameters of their own too).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gkpd.attention_counting import attention_products_macs
from gkpd.layers.base import fx_leaf_call, refuse_script
from gkpd.layers.gates import dense_linear
from gkpd.layers.recurrent import UNPACKED_RECURRENT
from gkpd.layers.recurrent_cells import UNPACKED_CELLS
from gkpd.state_dicts import copy_parameter
from gkpd.transposed_linear import as_linear, is_transposed_linear

__all__ = ["UNPACKED", "UnfusedTransformerEncoderLayer", "UnpackedMultiheadAttention",
           "fuse_again", "unfuse", "unpackable", "unpacked", "with_unpacked_attention",
           "with_unpacked_layers"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
# what an nn.TransformerEncoder's use_nested_tensor was before unfuse turned it off
_NESTED_BEFORE = "_gkpd_use_nested_tensor"


def _additive_mask(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask; a float one as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise TypeError(f"{name} must be a bool or floating point tensor, got {mask.dtype}")
    return mask.to(dtype)


class UnpackedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its projections as called ``nn.Linear`` modules.

    Same arguments, forward signature and outputs as ``nn.MultiheadAttention`` (masks,
    ``batch_first``, unbatched inputs, ``bias_k``/``bias_v``, ``add_zero_attn``, ``kdim``/
    ``vdim``, attention weights); :meth:`from_torch` converts one exactly.
    """

    def __init__(
        self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
        add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
        vdim: int | None = None, batch_first: bool = False, device=None, dtype=None,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                f"num_heads={num_heads}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> UnpackedMultiheadAttention:
        """The same attention as ``module`` (its weights copied), in its train/eval mode."""
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be an nn.MultiheadAttention, got {type(module).__name__}")
        out = module.out_proj
        new = cls(
            module.embed_dim, module.num_heads, module.dropout, out.bias is not None,
            module.bias_k is not None, module.add_zero_attn, module.kdim, module.vdim,
            module.batch_first, device=out.weight.device, dtype=out.weight.dtype,
        )
        e = module.embed_dim
        if module.in_proj_weight is not None:
            weights = module.in_proj_weight.split(e)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.split(e)
        sources = [(w, b) for w, b in zip(weights, biases, strict=True)]
        sources.append((out.weight, out.bias))
        with torch.no_grad():
            for name, (weight, bias) in zip(_PROJECTIONS, sources, strict=True):
                linear = getattr(new, name)
                copy_parameter(linear.weight, weight)
                if bias is not None:
                    copy_parameter(linear.bias, bias)
            for name in ("bias_k", "bias_v"):
                if getattr(module, name) is not None:
                    getattr(new, name).copy_(getattr(module, name))
        return new.train(module.training)

    def to_dense(self) -> nn.Module:
        """The ``nn.MultiheadAttention`` computing the same function (what
        :func:`gkpd.export.merge` puts in its place: torch's fused kernels run it), its
        projections made dense where they are Kronecker layers; this module itself where a
        projection has no dense form (the svd baseline's two linears)."""
        layers = [dense_linear(getattr(self, name)) for name in _PROJECTIONS]
        if any(linear is None for linear in layers):
            return self
        q, k, v, out = layers
        module = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, self.dropout, out.bias is not None,
            self.bias_k is not None, self.add_zero_attn, self.kdim, self.vdim, self.batch_first,
            device=out.weight.device, dtype=out.weight.dtype,
        )
        with torch.no_grad():
            # packed, the projections share one requires_grad: the query's
            if module.in_proj_weight is not None:
                copy_parameter(module.in_proj_weight,
                               torch.cat([q.weight, k.weight, v.weight]).requires_grad_(
                                   q.weight.requires_grad))
            else:
                for name, linear in zip(("q", "k", "v"), (q, k, v), strict=True):
                    copy_parameter(getattr(module, f"{name}_proj_weight"), linear.weight)
            if module.in_proj_bias is not None:
                copy_parameter(module.in_proj_bias,
                               torch.cat([q.bias, k.bias, v.bias]).requires_grad_(
                                   q.bias.requires_grad))
            copy_parameter(module.out_proj.weight, out.weight)
            if out.bias is not None:
                copy_parameter(module.out_proj.bias, out.bias)
            for name in ("bias_k", "bias_v"):
                if getattr(self, name) is not None:
                    getattr(module, name).copy_(getattr(self, name))
        return module.train(self.training)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
        need_weights: bool = True, attn_mask: Tensor | None = None,
        average_attn_weights: bool = True, is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(query, torch.fx.Proxy):
            return fx_leaf_call(self, query, key, value, key_padding_mask, need_weights,
                                attn_mask, average_attn_weights, is_causal)
        batched = query.dim() == 3
        # the projections run on the inputs as given (their traced input sizes are the
        # caller's); the attention between them works sequence first
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if not batched:
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        mask = _additive_mask(attn_mask, "attn_mask", q.dtype)
        padding = _additive_mask(key_padding_mask, "key_padding_mask", q.dtype)
        if is_causal and mask is None:
            raise RuntimeError("is_causal is a hint that attn_mask is causal: pass attn_mask")
        out, weights = self._attend(q, k, v, mask, padding, need_weights, is_causal)
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights if batched else weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return self.out_proj(out), weights

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                padding: Tensor | None, need_weights: bool, is_causal: bool):
        """``(output, weights or None)`` of the heads for projected ``q``, ``k``, ``v``
        ``(length, N, embed_dim)`` and additive masks; the output as ``q``, the weights
        ``(N, heads, L, S)``."""
        length, batch, _ = q.shape
        causal = is_causal and padding is None and not need_weights
        if causal:
            mask = None  # scaled_dot_product_attention applies it
        if mask is not None:  # (L, S) or (N·heads, L, S)
            mask = mask.view(1, 1, *mask.shape) if mask.dim() == 2 else mask.view(
                batch, self.num_heads, *mask.shape[1:]
            )
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, batch, -1)])
            v = torch.cat([v, self.bias_v.expand(1, batch, -1)])
            mask, padding = _pad_key(mask), _pad_key(padding)
        q, k, v = (t.reshape(t.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
                   for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, self.num_heads, 1, self.head_dim)
            k, v = torch.cat([k, zeros], 2), torch.cat([v, zeros], 2)
            mask, padding = _pad_key(mask), _pad_key(padding)
        if padding is not None:
            padding = padding.view(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            if dropout > 0:  # the weights returned are those applied, as torch's are
                weights = F.dropout(weights, dropout)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
        return out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim), weights

    def attention_macs(self, query_shape: Sequence[int], key_shape: Sequence[int]) -> int:
        """MACs of the attention products (``QKᵀ`` and the weighted sum of the values) of one
        call on a query and key of these shapes; the projections count as their own layers."""
        return attention_products_macs(self, query_shape, key_shape)

    def __prepare_scriptable__(self):
        refuse_script(self, "its forward handles masks and options in Python")

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}")


def _pad_key(mask: Tensor | None) -> Tensor | None:
    """``mask`` with one more, attended, key position (for ``bias_k`` or a zero key)."""
    return None if mask is None else F.pad(mask, (0, 1))


class UnfusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always runs its submodules: torch's fused inference
    kernel reads ``linear1.weight`` and the packed attention weights, which compressed or
    unpacked children do not have (:func:`unfuse` converts a layer in place)."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._ff_block(x))


def _fusable(layer: nn.TransformerEncoderLayer) -> bool:
    """Whether the fused kernel can still read every weight it needs from ``layer``."""
    return (isinstance(layer.self_attn, nn.MultiheadAttention)
            and isinstance(layer.linear1, nn.Linear) and isinstance(layer.linear2, nn.Linear))


def fuse_again(model: nn.Module) -> nn.Module:
    """Undo :func:`unfuse` where it is no longer needed, in place: every
    :class:`UnfusedTransformerEncoderLayer` whose children are torch's again (after
    :func:`gkpd.export.merge`) becomes an ``nn.TransformerEncoderLayer``, and an
    ``nn.TransformerEncoder`` of such layers gets back the nested-tensor path it had. Returns
    ``model``."""
    modules = list(model.modules())
    for module in modules:
        if type(module) is UnfusedTransformerEncoderLayer and _fusable(module):
            module.__class__ = nn.TransformerEncoderLayer
    for module in modules:
        if _NESTED_BEFORE in module.__dict__ and not any(
            isinstance(layer, UnfusedTransformerEncoderLayer) for layer in module.layers
        ):
            module.use_nested_tensor = module.__dict__.pop(_NESTED_BEFORE)
    return model


def unfuse(model: nn.Module) -> nn.Module:
    """Make, in place, every ``nn.TransformerEncoderLayer`` whose attention or feed-forward
    layers were replaced run through them (:class:`UnfusedTransformerEncoderLayer`), and turn
    off the nested-tensor path of the ``nn.TransformerEncoder`` holding it (that path needs
    the fused layers). Returns ``model``.

    The outputs at the positions ``src_key_padding_mask`` masks are then those of torch's
    unfused path (computed from the padding tokens, as in training mode), where the nested
    path of a dense encoder in eval mode returns zeros: pool with the mask, not by trusting
    padded positions to be zero."""
    _unfuse(list(model.modules()))
    return model


def _unfuse(modules: list[nn.Module]) -> None:
    """:func:`unfuse` on these modules only."""
    for module in modules:
        if type(module) is nn.TransformerEncoderLayer and not _fusable(module):
            module.__class__ = UnfusedTransformerEncoderLayer  # no state of its own to add
    for module in modules:
        if isinstance(module, nn.TransformerEncoder) and any(
            isinstance(layer, UnfusedTransformerEncoderLayer) for layer in module.layers
        ):
            # kept for fuse_again(), once (a second unfuse must not record its own False)
            module.__dict__.setdefault(_NESTED_BEFORE, module.use_nested_tensor)
            module.use_nested_tensor = False


def _unpacker(module: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """What builds ``module``'s unpacked equivalent; ``None`` for a module that is not
    unpacked."""
    if is_transposed_linear(module):
        return as_linear
    kind = next((new for old, new in UNPACKED.items() if isinstance(module, old)), None)
    return None if kind is None else kind.from_torch


def unpackable(module: nn.Module) -> bool:
    """Whether planning and :func:`gkpd.apply_` put an unpacked equivalent in ``module``'s
    place: a module of :data:`UNPACKED`, or transformers' ``Conv1D`` (an ``nn.Linear``,
    :mod:`gkpd.transposed_linear`)."""
    return _unpacker(module) is not None


def unpacked(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Per name of a module of ``model`` that is :func:`unpackable` (an
    ``nn.MultiheadAttention``, ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` or one of their cells, or
    transformers' ``Conv1D``), its unpacked equivalent (new modules; ``model`` is not
    changed)."""
    result = {}
    for name in names:
        module = model.get_submodule(name)
        unpack = _unpacker(module)
        if unpack is None:
            raise TypeError(f"{name!r} is a {type(module).__name__}, not one of "
                            f"{', '.join(t.__name__ for t in UNPACKED)} or transformers' Conv1D")
        result[name] = unpack(module)
    return result


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with the children, parameters, buffers and hooks of ``module``, in
    dicts of its own (so that changing which children it has changes only the copy)."""
    clone = copy.copy(module)
    clone.__dict__.update({k: copy.copy(v) for k, v in vars(module).items() if isinstance(v, dict)})
    return clone


def with_unpacked_layers(model: nn.Module) -> nn.Module:
    """``model`` prepared for planning: every module that :data:`UNPACKED` lists unpacked
    (attention, recurrent layers) and its transformer layers unfused, as a copy that shares
    every other module and parameter (for reading: planning traces it); ``model`` itself
    when it has none."""
    names = [n for n, m in model.named_modules() if unpackable(m)]
    if not names:
        return model
    root = _shallow_copy(model)
    copies = {"": root}  # the modules on the way to a replacement, copied so as to be changed
    for name, replacement in unpacked(model, names).items():
        parts = name.split(".")
        for depth in range(1, len(parts)):
            path = ".".join(parts[:depth])
            if path not in copies:
                parent = copies[".".join(parts[: depth - 1])]
                child = _shallow_copy(parent._modules[parts[depth - 1]])
                parent._modules[parts[depth - 1]] = copies[path] = child
        copies[".".join(parts[:-1])]._modules[parts[-1]] = replacement
    _unfuse(list(copies.values()))  # the shared modules stay as they are
    return root


def with_unpacked_attention(model: nn.Module) -> nn.Module:
    """Deprecated name of :func:`with_unpacked_layers` (which unpacks recurrent layers too)."""
    warnings.warn("with_unpacked_attention is deprecated: use with_unpacked_layers",
                  DeprecationWarning, stacklevel=2)
    return with_unpacked_layers(model)


# torch modules whose layers' weights are parameters of their own, and the equivalents whose
# layers are called modules (``from_torch``) that planning and apply_ put in their place
UNPACKED: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: UnpackedMultiheadAttention, **UNPACKED_RECURRENT, **UNPACKED_CELLS,
}
