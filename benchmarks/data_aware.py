"""Data-aware GKPD before fine-tuning: test accuracy and summed per-layer output error of the
shipped Fashion-MNIST ResNet-32 compressed by each variant, right after compression.

usage:
  python benchmarks/data_aware.py [--ratios 5,10] [--variants plain,white-init,...]
      [--samples 512] [--threads 1] [--out benchmarks/data_aware/before.jsonl]

Variants (gkpd.Calibration settings; 'plain' has no calibration):
  plain             GKPD as planned without data
  white-init        factors whitened on the calibration images; shapes and ranks as plain's
  white-select      ... and shapes, ranks ranked by the whitened output error
  white-init-seq    whitened, each layer fitted to the original outputs from the compressed
                    model's inputs (sequential)
  white-select-seq  both
The calibration images are a fixed draw (seed 0) of the training split, not augmented. A
uniform plan that misses the ratio falls back to the global strategy. One JSON line per
(ratio, variant) is appended to --out as it finishes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import gkpd
from gkpd import data
from gkpd.plan.budget import UnreachableRatio
from gkpd.train import evaluate

VARIANTS = {
    "plain": None,
    "white-init": {"select": False},
    "white-select": {"select": True},
    "white-init-seq": {"select": False, "sequential": True},
    "white-select-seq": {"select": True, "sequential": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="5,10")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/data_aware/before.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher = gkpd.models.load_pretrained("resnet32_fashion_mnist").eval()
    images = data.sample_inputs("fashion-mnist", args.samples)
    test = DataLoader(data.build_dataset("fashion-mnist", "test", augment=False), batch_size=500)
    x = torch.zeros(1, 1, 28, 28)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for ratio in (float(r) for r in args.ratios.split(",")):
        for name in args.variants.split(","):
            settings = VARIANTS[name]
            options = {} if settings is None else {
                "calibration": gkpd.Calibration(images, **settings)}
            started = time.perf_counter()
            try:
                model, plan = gkpd.compress(teacher, x, ratio=ratio, **options)
            except UnreachableRatio:
                model, plan = gkpd.compress(teacher, x, ratio=ratio, strategy="global",
                                            **options)
            seconds = time.perf_counter() - started
            accuracy = evaluate(model, test)["accuracy"]
            # each layer's output error on the calibration images, under the full covariance
            if settings is None:
                errors = _plain_output_errors(teacher, model, images, plan)
            else:
                errors = [e.settings["output_error"] for e in plan.compressed_layers]
            row = {
                "ratio": ratio, "variant": name, "strategy": plan.strategy,
                "achieved_ratio": round(plan.achieved_ratio, 3),
                "accuracy_before": round(accuracy, 2),
                "summed_output_error": None if errors is None else round(sum(errors), 3),
                "macs": plan.macs, "plan_seconds": round(seconds, 1),
                "samples": args.samples, "threads": args.threads,
            }
            print(json.dumps(row), flush=True)
            with out.open("a", encoding="utf-8") as f:  # one line per finished variant
                f.write(json.dumps(row) + "\n")


def _plain_output_errors(teacher, model, images, plan) -> list[float]:
    from gkpd.calibration import Calibration, collect_covariances
    from gkpd.whiten import output_error

    names = [e.name for e in plan.compressed_layers]
    covs = collect_covariances(teacher, {n: teacher.get_submodule(n) for n in names},
                               Calibration(images))
    return [output_error(teacher.get_submodule(n).weight,
                         model.get_submodule(n).reconstruct_weight(), covs[n]) for n in names]


if __name__ == "__main__":
    main()
