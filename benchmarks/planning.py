"""Time to plan a whole model: ResNet-50 at 224 px (ImageNet shapes), ResNet-32, and the 36
encoder linears of all-MiniLM-L6-v2 (issue 15's case: ratio 1.5, ``include`` the encoder).

usage: python benchmarks/planning.py [--threads 2] [--ratio 5] [--strategies uniform global]
                                     [--models resnet50 resnet32 minilm] [--repeats 1]

ResNet weights are random (no ImageNet weights here): the planner's cost depends on shapes,
not on values. MiniLM's pretrained weights come with the extra ``[transformers]``; without it
a randomly initialised BertModel of MiniLM's shapes stands in (its spectra, and so its search,
differ). Prints one line per (model, strategy, repeat) with wall-clock and CPU seconds (CPU
time says more on a loaded machine) and a markdown table of the fastest repeat.
"""

from __future__ import annotations

import argparse
import time

import torch

import gkpd

MODELS = ("resnet50", "resnet32", "minilm")


def _minilm():
    """``(model, example_input, plan options, name)``: the pretrained model where the extra is
    installed, else a random BertModel of its shapes (needs ``transformers``)."""
    try:
        model, name = gkpd.models.load_minilm(), "minilm"
    except ImportError:
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                            num_attention_heads=12)
        model, name = BertModel(config).eval(), "minilm (random weights)"
    ids = torch.randint(1000, 5000, (1, 128))
    return model, (ids, torch.ones_like(ids)), {"ratio": 1.5, "include": ["re:encoder\\..*"]}, name


def _case(name: str, ratio: float):
    if name == "resnet50":
        return gkpd.models.create("resnet50"), torch.randn(1, 3, 224, 224), {"ratio": ratio}, name
    if name == "resnet32":
        model = gkpd.models.create("resnet32", num_classes=10, in_channels=1)
        return model, torch.randn(1, 1, 28, 28), {"ratio": ratio}, name
    return _minilm()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=5.0, help="for the ResNets")
    parser.add_argument("--strategies", nargs="+", default=["uniform", "global"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for key in args.models:
        model, example, options, name = _case(key, args.ratio)
        model.eval()
        for strategy in args.strategies:
            best = None
            for _ in range(args.repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                plan = gkpd.plan(model, example, strategy=strategy, **options)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                done = len(plan.compressed_layers)
                print(f"{name} {strategy}: {wall:.1f} s ({cpu:.1f} s CPU), ratio "
                      f"{plan.achieved_ratio:.3f}, MACs {plan.mac_ratio:.2f}x fewer, "
                      f"{done}/{len(plan.layers)} layers", flush=True)
                if best is None or cpu < best[3]:
                    best = (name, strategy, wall, cpu, plan.achieved_ratio, plan.mac_ratio,
                            done, len(plan.layers))
            rows.append(best)
    print(f"\n| model | strategy | plan time (s, {args.threads} threads) | CPU s | achieved ratio "
          "| MAC reduction | layers compressed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, strategy, wall, cpu, ratio, macs, done, total in rows:
        print(f"| {name} | {strategy} | {wall:.1f} | {cpu:.1f} | {ratio:.3f} | {macs:.2f}x | "
              f"{done}/{total} |")


if __name__ == "__main__":
    main()
