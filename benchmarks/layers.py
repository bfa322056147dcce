"""Benchmark the GKPD core: decomposition time, and forward latency of Kronecker convolutions.

    python benchmarks/layers.py [--repeats 5] [--threads 2] [--quick]

1. Decomposing one 256×256×3×3 weight (float32) for two splits: ``gkpd.decompose`` against
   the SVD of the already rearranged matrix alone, and against a patch-by-patch reference
   (a Python loop over the blocks of the weight, then the same SVD).
2. Forward latency (batch 1 and 64, no grad) of 3×3 convolutions of CIFAR ResNet-32 and
   ResNet-50, dense against Kronecker layers with about 5× fewer parameters, several factor
   configurations per shape; for the fastest configuration, the layer against a plain
   two-stage reference written here (DESIGN.md §1 literally: grouped conv over r, then sum).

Every ratio compares timings taken side by side, interleaved, in this one run (medians).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import gkpd
from gkpd.counting import conv_macs, kronecker_conv_order_macs
from gkpd.decompose import divisors, rearrange

# ----------------------------------------------------------------------------- helpers


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, timed round-robin."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


# ----------------------------------------------------------------------------- decomposition


def patch_loop_rearrange(w: torch.Tensor, a_shape, b_shape) -> torch.Tensor:
    """Reference: one Python iteration per block of ``w`` (block shape ``b_shape``)."""
    rows = []
    for index in itertools.product(*(range(n) for n in a_shape)):
        block = w[tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, b_shape, strict=True))]
        rows.append(block.reshape(-1))
    return torch.stack(rows)


def patch_loop_decompose(w, a_shape, b_shape):
    m = patch_loop_rearrange(w, a_shape, b_shape)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s.sqrt()
    return (u * root).T.reshape(-1, *a_shape), (vh * root[:, None]).reshape(-1, *b_shape)


def bench_decompose(repeats: int) -> list[str]:
    torch.manual_seed(0)
    w = torch.randn(256, 256, 3, 3)
    lines = [
        "| split a / b | patches | decompose ms | SVD alone ms | decompose / SVD | "
        "patch loop ms | patch loop / decompose |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for a_shape, b_shape in [((64, 64, 3, 3), (4, 4, 1, 1)), ((16, 16, 3, 1), (16, 16, 1, 3))]:
        m = rearrange(w, a_shape, b_shape).contiguous()
        ref = patch_loop_decompose(w, a_shape, b_shape)
        ours = gkpd.decompose(w, a_shape, b_shape)
        torch.testing.assert_close(gkpd.kron_sum(*ref), ours.reconstruct(), rtol=1e-3, atol=1e-3)
        # decompose and the SVD alone side by side (many repeats: they take milliseconds),
        # then the slow patch loop next to decompose again
        t = interleaved(
            {
                "decompose": lambda a=a_shape, b=b_shape: gkpd.decompose(w, a, b),
                "svd": lambda m=m: torch.linalg.svd(m, full_matrices=False),
            },
            repeats * 4 + 1,
        )
        t["loop"] = interleaved(
            {
                "decompose": lambda a=a_shape, b=b_shape: gkpd.decompose(w, a, b),
                "loop": lambda a=a_shape, b=b_shape: patch_loop_decompose(w, a, b),
            },
            repeats,
        )["loop"]
        lines.append(
            f"| {a_shape} / {b_shape} | {math.prod(a_shape)} | {ms(t['decompose'])} | "
            f"{ms(t['svd'])} | {t['decompose'] / t['svd']:.2f}× | {ms(t['loop'])} | "
            f"{t['loop'] / t['decompose']:.0f}× |"
        )
    return lines


# ----------------------------------------------------------------------------- latency


def candidate_configs(channels: int, size: int, ratio: float = 5.0, keep: int = 5):
    """Factor shapes and ranks of a 3×3 ``channels→channels`` conv at about ``ratio``× fewer
    parameters: the lowest-MAC configurations, plus the lowest-MAC one per kernel split."""
    dense = channels * channels * 9
    found = []
    for f1, c1, k1 in itertools.product(
        divisors(channels), divisors(channels), [(3, 3), (3, 1), (1, 3), (1, 1)]
    ):
        a = (f1, c1, *k1)
        b = (channels // f1, channels // c1, 3 // k1[0], 3 // k1[1])
        pa, pb = math.prod(a), math.prod(b)
        rank = max(1, round(dense / (ratio * (pa + pb))))
        if rank > min(pa, pb):
            continue
        achieved = dense / (rank * (pa + pb))
        if not ratio * 0.9 <= achieved <= ratio * 1.1:
            continue
        macs = kronecker_conv_order_macs((size, size), a, b, rank, padding=1)
        found.append((min(macs.values()), a, rank, achieved))
    found.sort()
    chosen = found[:3]
    for k1 in [(3, 3), (3, 1), (1, 1)]:
        best = next((c for c in found if c[1][2:] == k1), None)
        if best is not None and best not in chosen:
            chosen.append(best)
    return chosen[:keep]


def reference_forward(layer: gkpd.KroneckerConv2d, x: torch.Tensor, order: str):
    """Plain two-stage forward (DESIGN.md §1 as written): groups=R in the second stage, then
    a sum over r; stride only in the second stage; zero padding applied to the input."""
    r = layer.rank
    f1, c1, *k1 = layer.a_shape
    f2, c2, *k2 = layer.b_shape
    n = x.shape[0]
    x = F.pad(x, [p for pair in reversed(layer._pads) for p in pair])
    sp = x.shape[2:]
    if order == "b_first":
        y = F.conv2d(x.reshape(n * c1, c2, *sp), layer.b.reshape(r * f2, c2, *k2))
        y = y.reshape(n, c1, r, f2, *y.shape[2:]).permute(0, 3, 2, 1, 4, 5)
        y = y.reshape(n * f2, r * c1, *y.shape[4:])
        dil = tuple(d * k for d, k in zip(layer.dilation, k2, strict=True))
        z = F.conv2d(y, layer.a.reshape(r * f1, c1, *k1), None, layer.stride, 0, dil, r)
        z = z.reshape(n, f2, r, f1, *z.shape[2:]).sum(2)
        out = z.permute(0, 2, 1, 3, 4).reshape(n, f1 * f2, *z.shape[3:])
    else:
        xa = x.reshape(n, c1, c2, *sp).transpose(1, 2).reshape(n * c2, c1, *sp)
        dil = tuple(d * k for d, k in zip(layer.dilation, k2, strict=True))
        y = F.conv2d(xa, layer.a.reshape(r * f1, c1, *k1), None, 1, 0, dil)
        y = y.reshape(n, c2, r, f1, *y.shape[2:]).permute(0, 3, 2, 1, 4, 5)
        y = y.reshape(n * f1, r * c2, *y.shape[4:])
        z = F.conv2d(y, layer.b.reshape(r * f2, c2, *k2), None, layer.stride, 0,
                     layer.dilation, r)
        out = z.reshape(n, f1, r, f2, *z.shape[2:]).sum(2).reshape(n, f1 * f2, *z.shape[2:])
    return out


SHAPES = [
    ("ResNet-32", 16, 32),
    ("ResNet-32", 32, 16),
    ("ResNet-32", 64, 8),
    ("ResNet-50", 64, 56),
    ("ResNet-50", 128, 28),
    ("ResNet-50", 256, 14),
    ("ResNet-50", 512, 7),
]


def bench_latency(repeats: int, batches: list[int], quick: bool) -> tuple[list[str], list[str]]:
    detail = [
        "| net | C→F @ px | batch | a_shape | rank | params ÷ | MACs ÷ | order | ms | "
        "speed vs dense |",
        "|---|---|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    summary = [
        "| net | C→F @ px | batch | dense ms | fastest 5× config (a_shape, rank, order) | "
        "ms | speed vs dense | layer vs two-stage reference |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    shapes = SHAPES[:4] if quick else SHAPES
    for net, ch, px in shapes:
        torch.manual_seed(0)
        dense = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        configs = candidate_configs(ch, px)
        layers = {
            (a, rank): gkpd.KroneckerConv2d.from_dense(dense, a_shape=a, rank=rank)
            for _, a, rank, _ in configs
        }
        for batch in batches:
            x = torch.randn(batch, ch, px, px)
            fns = {"dense": lambda x=x, d=dense: d(x)}
            fns.update({key: (lambda x=x, m=m: m(x)) for key, m in layers.items()})
            with torch.no_grad():
                t = interleaved(fns, repeats)
            dense_macs = conv_macs((px, px), ch, ch, (3, 3), padding=1, batch=batch)
            for _, a, rank, achieved in configs:
                layer = layers[(a, rank)]
                detail.append(
                    f"| {net} | {ch}→{ch} @ {px} | {batch} | {a} | {rank} | {achieved:.2f} | "
                    f"{dense_macs / layer.macs(x.shape):.2f} | {layer.resolve_path(x.shape)} | "
                    f"{ms(t[(a, rank)])} | {t['dense'] / t[(a, rank)]:.2f}× |"
                )
            best = min(layers, key=lambda k: t[k])
            layer = layers[best]
            order = layer.resolve_path(x.shape)
            with torch.no_grad():
                torch.testing.assert_close(
                    reference_forward(layer, x, order), layer(x), rtol=1e-3, atol=1e-3
                )
                ref = interleaved(
                    {
                        "layer": lambda x=x, m=layer: m(x),
                        "reference": lambda x=x, m=layer, o=order: reference_forward(m, x, o),
                    },
                    repeats,
                )
            summary.append(
                f"| {net} | {ch}→{ch} @ {px} | {batch} | {ms(t['dense'])} | {best[0]}, "
                f"R={best[1]}, {order} | {ms(t[best])} | {t['dense'] / t[best]:.2f}× | "
                f"{ref['reference'] / ref['layer']:.2f}× faster |"
            )
            print(summary[-1], flush=True)
    return summary, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: with a second process busy on a 2-core machine, 2 threads "
        "make OpenMP barriers stall and the timings meaningless)",
    )
    parser.add_argument("--quick", action="store_true", help="ResNet-32 shapes only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved runs\n")
    print("### Decomposition of a 256×256×3×3 weight (float32)\n")
    print("\n".join(bench_decompose(args.repeats)), flush=True)
    print("\n### Forward latency, 3×3 convs at about 5× fewer parameters (no grad)\n")
    summary, detail = bench_latency(args.repeats, [1, 64], args.quick)
    print("\nFastest configuration per shape:\n")
    print("\n".join(summary))
    print("\nAll configurations:\n")
    print("\n".join(detail))


if __name__ == "__main__":
    main()
