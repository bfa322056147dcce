"""Time to plan a whole model: ResNet-50 at 224 px (ImageNet shapes) and ResNet-32.

usage: python benchmarks/planning.py [--threads 2] [--ratio 5] [--strategies uniform global]

Weights are random (no ImageNet weights here): the planner's cost depends on shapes, not on
values. Prints one line per (model, strategy) and a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch

import gkpd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=5.0)
    parser.add_argument("--strategies", nargs="+", default=["uniform", "global"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = [
        ("resnet50", gkpd.models.create("resnet50"), torch.randn(1, 3, 224, 224)),
        ("resnet32", gkpd.models.create("resnet32", num_classes=10, in_channels=1),
         torch.randn(1, 1, 28, 28)),
    ]
    rows = []
    for name, model, example in cases:
        model.eval()
        for strategy in args.strategies:
            started = time.perf_counter()
            plan = gkpd.plan(model, example, ratio=args.ratio, strategy=strategy)
            seconds = time.perf_counter() - started
            rows.append((name, strategy, seconds, plan.achieved_ratio, plan.mac_ratio,
                         len(plan.compressed_layers), len(plan.layers)))
            print(f"{name} {strategy}: {seconds:.1f} s, ratio {plan.achieved_ratio:.3f}, "
                  f"MACs {plan.mac_ratio:.2f}x fewer, {rows[-1][5]}/{rows[-1][6]} layers",
                  flush=True)
    print(f"\n| model | strategy | plan time (s, {args.threads} threads) | achieved ratio | "
          "MAC reduction | layers compressed |")
    print("|---|---|---:|---:|---:|---:|")
    for name, strategy, seconds, ratio, macs, done, total in rows:
        print(f"| {name} | {strategy} | {seconds:.1f} | {ratio:.3f} | {macs:.2f}x | "
              f"{done}/{total} |")


if __name__ == "__main__":
    main()
