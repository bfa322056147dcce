"""Does every method reach the asked ratio with its defaults? (issue 13)

Plans the shipped Fashion-MNIST ResNet-32 at 5x and 10x with each method and default arguments
(``gkpd.plan(model, x, ratio=R, method=M)``), and records the ratio reached, the strategy the
plan says it used (``global`` where uniform's rank steps missed) and the planning CPU time.

usage: OMP_NUM_THREADS=1 python benchmarks/default_ratios.py \
    [--out benchmarks/default_ratios/results.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import gkpd
from gkpd.files import atomic_write_text
from gkpd.methods import method_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/default_ratios/results.json")
    args = parser.parse_args()
    model = gkpd.models.load_pretrained("resnet32_fashion_mnist")
    x = torch.zeros(1, 1, 28, 28)
    rows = []
    for method in [m for m in method_names() if m != "prune"]:
        for ratio in (5, 10):
            started = time.process_time()
            try:
                plan = gkpd.plan(model, x, ratio=ratio, method=method)
                row = {"achieved_ratio": round(plan.achieved_ratio, 3), "strategy": plan.strategy,
                       "within_3pct": abs(plan.achieved_ratio / ratio - 1) <= 0.03}
            except (ValueError, ImportError) as error:
                row = {"error": f"{type(error).__name__}: {error}"}
            rows.append({"method": method, "ratio": ratio, **row,
                         "cpu_seconds": round(time.process_time() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    atomic_write_text(args.out, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
