"""The speed benchmark's peers: TensorLy-Torch's factorized convolutions (CP, Tucker-2, TT)
in place of the layers a GKPD plan compresses, at the GKPD layers' parameter counts."""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

PEERS = ("cp", "tucker", "tt")


def tltorch_peer(model: nn.Module, plan, factorization: str, *,
                 decompose: bool = True) -> nn.Module:
    """A copy of ``model`` with every 2-d convolution the GKPD ``plan`` compressed replaced by
    TensorLy-Torch's ``FactorizedConv`` (``factorization`` cp, tucker — Tucker-2, spatial modes
    kept whole — or tt), run factorized, with the parameter count closest to the GKPD layer's
    (the rank is searched per layer). With ``decompose`` the factors are decomposed from the
    layer's weights (a CP decomposition of a large layer takes minutes); without, they are
    random, scaled to the layer's weight norm, and time the same. Compressed layers
    TensorLy-Torch cannot take (linear, grouped, non-2-d, non-square strides, string
    paddings, non-zero padding modes) stay dense; the benchmark's notes count them."""
    return build_peer(model, plan, factorization, decompose)[0]


def build_peer(model: nn.Module, plan, factorization: str,
                  decompose: bool) -> tuple[nn.Module, int]:
    """:func:`tltorch_peer` and the number of compressed layers it left dense."""
    if factorization not in PEERS:
        raise ValueError(f"factorization must be one of {list(PEERS)}, got {factorization!r}")
    try:
        import tltorch
    except ImportError as error:
        raise ImportError(
            "the speed benchmark's peers need TensorLy-Torch: pip install tensorly-torch"
        ) from error

    peer = copy.deepcopy(model)
    skipped = 0
    for entry in plan.compressed_layers:
        conv = peer.get_submodule(entry.name)
        if not _tltorch_can_take(conv):
            skipped += 1
            continue
        bias = conv.bias.numel() if conv.bias is not None else 0
        rank = _peer_rank(tltorch, conv, entry.params - bias, factorization, decompose)
        with warnings.catch_warnings():  # tensorly: "n_eigenvecs ... larger than ..."
            warnings.filterwarnings("ignore", message=".*n_eigenvecs", category=UserWarning)
            layer = tltorch.FactorizedConv.from_conv(
                conv, rank=rank, factorization=factorization, implementation="factorized",
                decompose_weights=decompose,
            )
        if not decompose:
            _match_scale(layer, conv)
        peer.set_submodule(entry.name, layer)
    return peer.eval(), skipped


@torch.no_grad()
def _match_scale(layer: nn.Module, conv: nn.Conv2d) -> None:
    """Give the randomly initialized ``layer`` the dense layer's bias and weight norm, so its
    activations are on the model's scale (tiny ones could turn subnormal, and slow)."""
    if conv.bias is not None:
        layer.bias.copy_(conv.bias)
    # the weight is multilinear in its parameters: scaling one of them scales it
    norm = layer.weight.to_tensor().norm()
    if norm > 0:
        next(layer.weight.parameters()).mul_(conv.weight.norm() / norm)


def _tltorch_can_take(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d) and module.groups == 1
        and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        and len(set(module.stride)) == 1
    )


def _peer_rank(tltorch, conv: nn.Conv2d, target: int, factorization: str,
               decompose: bool) -> float | tuple[int, ...]:
    """The rank whose factorized weight has the parameter count closest to ``target``.
    Tucker: Tucker-2 (full spatial ranks), over the integer channel ranks; CP and TT: a fraction
    of the weight's size, as TensorLy-Torch takes it, by bisection."""
    out_channels, in_channels, *kernel = conv.weight.shape
    if factorization == "tucker":
        spatial, volume = sum(k * k for k in kernel), math.prod(kernel)
        options = []
        for r_out in range(1, out_channels + 1):
            ideal = (target - out_channels * r_out - spatial) / (in_channels + r_out * volume)
            for r_in in {max(1, min(in_channels, int(ideal) + d)) for d in (0, 1)}:
                size = out_channels * r_out + in_channels * r_in + r_out * r_in * volume + spatial
                balance = abs(r_out / out_channels - r_in / in_channels)
                options.append((abs(size - target), balance, r_out, r_in))
        # the ranks nearest the channels' proportion within 3% of the size, else the closest
        near = [(b, d, r, q) for d, b, r, q in options if d <= 0.03 * target]
        _, _, r_out, r_in = min(near) if near else min(options)
        return (r_out, r_in, *kernel)

    def size(fraction: float) -> int:
        weight = tltorch.FactorizedConv(
            in_channels, out_channels, conv.kernel_size, factorization=factorization,
            rank=fraction, implementation="factorized",
        ).weight
        if factorization != "tt" or not decompose:
            return sum(p.numel() for p in weight.parameters())
        # TT-SVD caps each rank at its unfolding's smaller side
        shape, ranks = list(weight.shape), [1]
        for k, wanted in enumerate(weight.rank[1:-1], start=1):
            ranks.append(min(wanted, ranks[-1] * shape[k - 1], math.prod(shape[k:])))
        ranks.append(1)
        return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))

    low, high = 1e-4, 1.0
    while size(high) < target and high < 64:
        high *= 2
    for _ in range(30):
        middle = (low + high) / 2
        if size(middle) < target:
            low = middle
        else:
            high = middle
    return min((low, high), key=lambda f: abs(size(f) - target))
