"""Which plan of all-MiniLM-L6-v2's encoder starts best, before any distillation (#15): the
factor shapes each planning option picks, their summed squared relative weight error, MACs,
and the held-out sentence embeddings' cosine to the original's.

usage:
  python benchmarks/minilm_plans.py [--out benchmarks/minilm_plans] [--ratio 2] [--threads 1]
      [--held-out-documents 300] [--calibration-documents 512]

Variants (each ``gkpd.compress`` of the encoder's linear layers at --ratio over their
parameters, as ``benchmarks/transformer_minilm.py`` plans them; the same held-out fortunes and
calibration documents):
  gkpd                     the defaults (weight error, uniform, no more MACs than dense)
  gkpd-more-macs           allow_more_macs=True: may a Kronecker split beat low rank when
                           its MACs are not bounded?
  gkpd-whiten              factors whitened on the calibration documents
  gkpd-whiten-select       ... and shapes and ranks ranked by that output error
  svd-whiten               activation-aware SVD (the data-aware baseline)
  svd-whiten-select-global ... with the budget allocated across layers by output error

Writes ``results.json`` (one row per variant) and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import gkpd
from gkpd.files import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transformer_minilm as minilm  # noqa: E402  (the benchmark's text, split and scoring)

# name: (method, calibration settings or None, other options of gkpd.compress)
VARIANTS = {
    "gkpd": ("gkpd", None, {}),
    "gkpd-more-macs": ("gkpd", None, {"allow_more_macs": True}),
    "gkpd-whiten": ("gkpd", {"select": False}, {}),
    "gkpd-whiten-select": ("gkpd", {"select": True}, {}),
    "svd-whiten": ("svd", {"select": False}, {}),
    "svd-whiten-select-global": ("svd", {"select": True}, {"strategy": "global"}),
}


def plan_row(name: str, teacher, data: dict, ratio: float) -> dict:
    method, calibration, options = VARIANTS[name]
    if calibration is not None:
        options = {**options, "calibration": gkpd.Calibration(data["calibration"],
                                                               **calibration)}
    started = time.perf_counter()
    student, plan = minilm.compress_encoder(teacher, data["example"], ratio, method, **options)
    seconds = time.perf_counter() - started
    encoder = minilm.encoder_entries(plan)
    compressed = [e for e in encoder if e.method != "dense"]
    splits = Counter(str(tuple(e.settings["a_shape"])) for e in compressed
                     if "a_shape" in e.settings)
    return {
        "variant": name, "method": method, "ratio": ratio, "strategy": plan.strategy,
        "encoder_linear_params": sum(e.params for e in encoder),
        "layers_compressed": len(compressed), "layers": len(encoder),
        "summed_squared_weight_error": round(sum(e.relative_error ** 2 for e in encoder), 4),
        "macs_over_dense": round(sum(e.macs for e in encoder)
                                 / sum(e.dense_macs for e in encoder), 4),
        "a_shapes": dict(splits.most_common()),
        "cosine_before": round(minilm.mean_cosine(minilm.embeddings(student, data["held_out"]),
                                                  data["teacher_embeddings"]), 5),
        "plan_seconds": round(seconds, 1),
    }


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "| variant | strategy | layers compressed | Σ squared weight error | MACs / dense "
             "| held-out cosine before distillation | A shapes (layers) | plan s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shapes = ", ".join(f"{s}: {n}" for s, n in r["a_shapes"].items()) or "–"
        lines.append(f"| {r['variant']} | {r['strategy']} | {r['layers_compressed']}/"
                     f"{r['layers']} | {r['summed_squared_weight_error']:.3f} | "
                     f"{r['macs_over_dense']:.2f} | {r['cosine_before']:.4f} | {shapes} | "
                     f"{r['plan_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/minilm_plans"))
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--held-out-documents", type=int, default=300)
    parser.add_argument("--calibration-documents", type=int, default=512)
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    if not args.ratio > 1:
        parser.error("--ratio must be > 1")
    for name in ("threads", "held_out_documents", "calibration_documents"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)
    tokenizer, teacher = minilm.load_minilm()
    data = minilm.text_data(tokenizer, teacher, minilm.FORTUNES, 0.1, 128,
                            args.held_out_documents, args.calibration_documents)
    rows = []
    for name in variants:
        rows.append(plan_row(name, teacher, data, args.ratio))
        print(json.dumps(rows[-1]), flush=True)
    command = "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json",
                      json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    atomic_write_text(args.out / "results.md", markdown(rows, command))


if __name__ == "__main__":
    main()
