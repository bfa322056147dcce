"""Which GKPD factor shapes fine-tune best (issue 12, "plans that train well").

The shipped Fashion-MNIST ResNet-32 is compressed with the shapes of one *family* on every
layer that the default 5x/10x GKPD plan compresses, each layer keeping the default plan's
parameter count (so every family has the same size), then distilled with the accuracy bench's
budget and settings (alpha 0.9, T 4, lr 0.01, batch 128, cosine). Families:

  planned   the default plan (what ``gkpd.compress`` picks: mostly a=(1,C,1,3), b=(F,1,3,1))
  channel   the whole kernel in one factor: a=(F1,C1,k,k), b=(F2,C2,1,1), the split with the
            least weight error at the layer's size
  tucker    Tucker-2 (``method="tucker"``), the strongest baseline, as the reference
  auto      ``method="auto"``: per layer GKPD, Tucker-2 or SVD, whichever keeps most weight

usage:
  python benchmarks/structure.py --families planned,channel,tucker --ratio 5 \
      --epochs 1 --train-subset 16000 [--threads 1] [--out benchmarks/structure/cells.jsonl] \
      [--feature-layers 're:layer\\d\\.\\d+']
One JSON line per family is appended to --out as it finishes; a family already there is skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import gkpd
from gkpd import data
from gkpd.counting import count_model
from gkpd.decompose import divisors, rearrange
from gkpd.train import evaluate
from gkpd.train.finetune import finetune, finetune_loader


def channel_split(weight: torch.Tensor, budget: int) -> dict:
    """The a=(F1,C1,k..), b=(F2,C2,1..) split and rank with the least weight error within
    ``budget`` weight parameters."""
    f, c, *kernel = weight.shape
    best = None
    for f1, c1 in itertools.product(divisors(f), divisors(c)):
        a = (f1, c1, *kernel)
        b = (f // f1, c // c1, *(1 for _ in kernel))
        rank = budget // (math.prod(a) + math.prod(b))
        if rank < 1 or math.prod(b) == 1:
            continue
        s = torch.linalg.svdvals(rearrange(weight.double(), a))
        rank = min(rank, len(s))
        error = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        if best is None or error < best[0]:
            best = (error, {"a_shape": a, "rank": rank})
    return best[1]


def build(family: str, teacher, x, ratio: float):
    if family in ("tucker", "auto"):
        return gkpd.compress(teacher, x, ratio=ratio, method=family)
    model, plan = gkpd.compress(teacher, x, ratio=ratio)
    if family == "planned":
        return model, plan
    if family != "channel":
        raise SystemExit(f"unknown family {family!r}")
    modules = dict(teacher.named_modules())
    overrides = {}
    for entry in plan.layers:
        if entry.method != "gkpd":
            continue
        weight = modules[entry.name].weight.detach()
        bias = 0 if modules[entry.name].bias is None else weight.shape[0]
        overrides[entry.name] = channel_split(weight, entry.params - bias)
    return gkpd.compress(teacher, x, ratio=ratio, strategy="global", overrides=overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="planned,channel,tucker")
    parser.add_argument("--ratio", type=float, default=5.0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=16000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/structure/cells.jsonl")
    parser.add_argument("--feature-layers", default=None, metavar="PATTERN",
                        help="also distil these blocks' outputs (gkpd finetune --feature-layers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.is_file():
        done = {(r["family"], r["ratio"], r["seed"], r["epochs"], r["train_samples"],
                 r.get("feature_layers")) for r in map(json.loads, out.read_text().splitlines())}
    teacher = gkpd.models.load_pretrained("resnet32_fashion_mnist").eval()
    x = torch.zeros(1, 1, 28, 28)
    test = DataLoader(data.build_dataset("fashion-mnist", "test", augment=False), batch_size=500)
    for family in args.families.split(","):
        key = (family, args.ratio, args.seed, args.epochs, args.train_subset, args.feature_layers)
        if key in done:
            print(f"{family}: recorded before, skipped")
            continue
        started = time.perf_counter()
        model, plan = build(family, teacher, x, args.ratio)
        for p in model.parameters():
            p.requires_grad_(True)
        counts = count_model(model, x)
        before = evaluate(model, test)["accuracy"]
        torch.manual_seed(args.seed)
        loader = finetune_loader("fashion-mnist", None, batch_size=128,
                                 train_subset=args.train_subset)
        finetune(model, teacher, loader, epochs=args.epochs, checkpoint_dir=None, resume=False,
                 progress=False, seed=args.seed, feature_layers=args.feature_layers)
        row = {
            "family": family, "ratio": args.ratio, "seed": args.seed, "epochs": args.epochs,
            "train_samples": args.train_subset, "feature_layers": args.feature_layers,
            "params": counts.total_params,
            "macs": counts.total_macs, "accuracy_before": before,
            "accuracy_after": evaluate(model, test)["accuracy"],
            "shapes": sorted({str(tuple(e.settings["a_shape"])) for e in plan.layers
                              if "a_shape" in e.settings}),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(row))
        with out.open("a") as f:  # one whole line per finished cell
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
