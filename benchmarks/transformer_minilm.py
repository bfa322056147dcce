"""all-MiniLM-L6-v2 compressed at 2x and 4x of its encoder's linear layers by each method,
distilled from the original with one budget, scored by held-out sentence embeddings (#15 item 5).

usage:
  python benchmarks/transformer_minilm.py [--out benchmarks/transformer_minilm]
      [--methods gkpd,svd,tucker,tensor_train] [--ratios 2,4] [--steps 2000]
      [--checkpoint-every 250] [--batch-size 32] [--lr 1e-4] [--threads 2] [--seed 0]
      [--calibration-documents 512]
  smoke run (one minute of CPU time on 1 thread, 3 minutes wall on a loaded machine; write it
  elsewhere):
  python benchmarks/transformer_minilm.py --out /tmp/minilm-smoke --methods svd,tucker \\
      --ratios 4 --steps 20 --checkpoint-every 10 --batch-size 8 --max-held-out 64 \\
      --latency-rounds 1 --latency-warmup 0 --threads 1

Text: every fortune of Debian's ``fortunes`` package (/usr/share/games/fortunes; one document
per fortune, overstrikes removed, duplicates dropped), split into train and held-out by a hash
of each document's text (deterministic; --held-out of them held out), tokenized to at most
--max-length tokens.

Each cell (method x ratio): ``gkpd.compress`` of the encoder's linear layers
(``include=["re:encoder\\\\..*"]``) so that they shrink ``ratio``-fold together (the whole-model
ratio passed to ``compress`` is worked out from that; the uniform strategy, or the global one
where uniform misses it). A method is one of ``gkpd.methods`` or a variant of
``gkpd.bench.variants`` (``gkpd-whiten``: GKPD's factors fitted to the first
--calibration-documents train documents' activations); then ``gkpd.train.fit`` from the original as
teacher on the train split, the same budget for every method (--steps of --batch-size, AdamW at
--lr, cosine schedule with --warmup), dropout off, the loss the cosine distance of the last hidden
states over the real tokens plus --feature-weight times that of each earlier encoder layer's output
plus --pooled-weight times that of the mean-pooled last hidden states (the sentence embeddings,
what the cosine below scores; 0 by default).
A cell writes ``cells/<method>-<ratio>x/result.json`` when done and is skipped on a rerun; an
interrupted cell resumes from its checkpoint (``fit/``, every --checkpoint-every steps). Every
cell of one --out must share the budget (the options in ``BUDGET``): a run that asks for
another refuses before it starts.
Methods that cannot compress a linear layer (tucker: convolutions only) are skipped and listed
in ``run.json``. Planning tensor_train took 10 minutes a ratio on one (shared) thread.

Then every finished cell's model and the original are timed side by side (interleaved rounds,
``gkpd.timing.time_interleaved``) at batch 32 x 128 tokens, and ``results.json`` gets one row
per finished cell under ``cells/`` (this run's and earlier ones'): ``method``, ``ratio`` (the
target over the encoder's linear layers; ``achieved_ratio`` is what the plan reached),
``params`` (the whole model's), ``cosine`` (mean cosine of the held-out documents' mean-pooled
embeddings to the original's; ``cosine_before`` before distillation), ``latency_ms`` (median);
``compress_seconds`` is planning and applying, or applying alone where the cell replayed its
saved plan after an interruption. ``run.json`` holds the settings, the original's figures, the
environment and the command.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

import gkpd
from gkpd.bench.variants import base_method, compress_options, needs_calibration
from gkpd.files import atomic_write_text
from gkpd.methods import get_method
from gkpd.plan.budget import UnreachableRatio
from gkpd.timing import cpu_model, time_interleaved
from gkpd.train import fit, hidden_state_loss
from gkpd.train.objectives import mean_pool

FORTUNES = Path("/usr/share/games/fortunes")
NOT_TEXT = {"ascii-art"}  # pictures drawn in characters
ENCODER = "re:encoder\\..*"
LATENCY_SHAPE = (32, 128)  # batch x tokens
BUDGET = ("steps", "batch_size", "lr", "weight_decay", "warmup", "feature_weight",
          "pooled_weight", "max_length", "held_out", "max_held_out", "seed")
# budget keys added after cells were recorded: what those cells ran with
RECORDED_BEFORE = {"pooled_weight": 0.0}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def load_minilm():
    """``(tokenizer, model)`` of all-MiniLM-L6-v2, dropout off, from local files only."""
    try:
        return gkpd.models.minilm_tokenizer(), gkpd.models.load_minilm(**NO_DROPOUT)
    except ImportError as error:  # the message names the [transformers] extra
        sys.exit(f"this benchmark needs the extra: {error}")


def documents(directory: Path) -> list[str]:
    """Every fortune (the text between ``%`` lines) of the fortune files in ``directory``,
    overstrikes (``c\\bc``) removed and whitespace collapsed, without duplicates, sorted."""
    if not directory.is_dir():
        sys.exit(f"{directory} does not exist: apt-get install fortunes")
    found = set()
    for path in sorted(directory.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file() or path.name in NOT_TEXT:
            continue  # .dat indexes, .u8 links
        text = path.read_text(encoding="utf-8", errors="replace")
        for fortune in re.split(r"^%$", text, flags=re.MULTILINE):
            fortune = " ".join(re.sub(".\x08", "", fortune).split())
            if len(fortune) >= 20:
                found.add(fortune)
    return sorted(found)


def split(texts: list[str], held_out: float) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` by a hash of each text: the same on every machine and run."""
    def bucket(text: str) -> float:
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    ranked = sorted(texts, key=bucket)
    cut = sum(bucket(t) < held_out for t in texts)
    return ranked[cut:], ranked[:cut]


class Tokenized(Dataset):
    def __init__(self, tokenizer, texts: list[str], max_length: int) -> None:
        self.rows = [dict(tokenizer(t, truncation=True, max_length=max_length)) for t in texts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def loader(tokenizer, data: Dataset, batch_size: int, sampler=None) -> DataLoader:
    """Batches padded to their longest document: dicts of keyword inputs."""
    return DataLoader(data, batch_size=batch_size, sampler=sampler,
                      collate_fn=lambda rows: dict(tokenizer.pad(rows, return_tensors="pt")))


@torch.no_grad()
def embeddings(model: nn.Module, batches: DataLoader) -> torch.Tensor:
    """Mean-pooled last hidden states over the real tokens (all-MiniLM-L6-v2's sentence
    embedding, before its normalisation, which cosines do not see)."""
    model.eval()
    return torch.cat([mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
                      for batch in batches])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item()


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encoder_linear_params(model: nn.Module) -> int:
    return sum(parameters(m) for name, m in model.named_modules()
               if name.startswith("encoder.") and isinstance(m, nn.Linear))


def model_ratio(model: nn.Module, encoder_ratio: float) -> float:
    """The whole-model ratio at which the encoder's linear layers shrink ``encoder_ratio``-fold
    and the rest (embeddings, norms, pooler) stays."""
    total, linear = parameters(model), encoder_linear_params(model)
    return total / (total - linear + linear / encoder_ratio)


def encoder_entries(plan) -> list:
    """The plan's entries of the encoder's linear layers (compressed or left dense)."""
    return [e for e in plan.layers if e.name.startswith("encoder.")]


def build_student(teacher: nn.Module, name: str, ratio: float, data: dict, cell: Path):
    """The compressed copy and its plan: planned once, replayed from the cell's plan.json.
    ``name`` is a method or a variant (``gkpd-whiten``: factors whitened on the calibration
    documents, which it needs again to replay)."""
    method, options = compress_options(name, data["calibration"])
    plan_path = cell / "plan.json"
    if plan_path.is_file():
        plan = gkpd.CompressionPlan.load(plan_path)
        return gkpd.apply_(copy.deepcopy(teacher), plan,
                           calibration=options.get("calibration")), plan
    student, plan = compress_encoder(teacher, data["example"], ratio, method, **options)
    plan.save(plan_path)
    return student, plan


def compress_encoder(teacher: nn.Module, example, ratio: float, method: str, **options):
    """``gkpd.compress`` of the encoder's linear layers ``ratio``-fold over their parameters;
    where the uniform strategy cannot reach it and no strategy is pinned, the global one."""
    options.update(ratio=model_ratio(teacher, ratio), method=method, include=[ENCODER],
                   tolerance=0.01)
    if "strategy" in options:
        return gkpd.compress(teacher, example, **options)
    try:
        return gkpd.compress(teacher, example, **options)
    except UnreachableRatio:
        return gkpd.compress(teacher, example, strategy="global", **options)


def text_data(tokenizer, teacher: nn.Module, fortunes: Path, held_out_share: float,
              max_length: int, max_held_out: int, calibration_documents: int) -> dict:
    """The benchmark's text, split by document: the tokenized train split, the held-out
    loader (its first ``max_held_out`` documents) and the teacher's embeddings of it, a
    two-document example in keyword inputs (as BERT is called), and the calibration loader
    (the first ``calibration_documents`` train documents, in batches padded to their longest;
    the variants that whiten their factors use them)."""
    train_texts, held_out_all = split(documents(fortunes), held_out_share)
    held_out_texts = held_out_all[:max_held_out]
    train = Tokenized(tokenizer, train_texts, max_length)
    held_out = loader(tokenizer, Tokenized(tokenizer, held_out_texts, max_length), 64)
    return {
        "tokenizer": tokenizer, "train": train, "held_out": held_out,
        "held_out_texts": held_out_texts,
        "documents": {"train": len(train_texts), "held_out": len(held_out_all),
                      "held_out_scored": len(held_out_texts)},
        "example": next(iter(loader(tokenizer, train, 2))),
        "calibration": loader(tokenizer, Subset(train, range(min(
            calibration_documents, len(train)))), 16),
        "teacher_embeddings": embeddings(teacher, held_out),
    }


def run_cell(args, method: str, ratio: float, teacher, data, cell: Path) -> dict:
    cell.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    student, plan = build_student(teacher, method, ratio, data, cell)
    compress_seconds = time.perf_counter() - started
    cosine_before = mean_cosine(embeddings(student, data["held_out"]), data["teacher_embeddings"])
    epochs = args.steps // args.checkpoint_every
    sampler = RandomSampler(data["train"], num_samples=args.checkpoint_every * args.batch_size)
    layers = len(teacher.encoder.layer)
    started = time.perf_counter()
    history = fit(
        student, loader(data["tokenizer"], data["train"], args.batch_size, sampler),
        epochs=epochs, teacher=teacher, loss_fn=distillation_loss(args.pooled_weight),
        feature_pairs={f"encoder.layer.{i}": f"encoder.layer.{i}" for i in range(layers - 1)},
        feature_loss="cosine", feature_weight=args.feature_weight, optimizer="adamw",
        lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=args.warmup * epochs,
        checkpoint_dir=cell / "fit", resume=True, device="cpu", progress=False, seed=args.seed,
    )
    distill_seconds = time.perf_counter() - started
    cosine = mean_cosine(embeddings(student, data["held_out"]), data["teacher_embeddings"])
    gkpd.save(cell / "model", student, plan)
    encoder = encoder_entries(plan)
    linear_params = sum(e.params for e in encoder)
    result = {
        "method": method, "ratio": ratio,
        "achieved_ratio": round(sum(e.dense_params for e in encoder) / linear_params, 4),
        "model_ratio": round(plan.achieved_ratio, 4), "strategy": plan.strategy,
        "params": parameters(student), "encoder_linear_params": linear_params,
        "cosine_before": round(cosine_before, 5), "cosine": round(cosine, 5),
        "steps": args.steps, "budget": budget(args),
        **({"calibration_documents": args.calibration_documents}
           if needs_calibration(method) else {}),
        "compress_seconds": round(compress_seconds, 1),
        "distill_seconds": round(distill_seconds, 1),
        "final_train_loss": round(history[-1]["train_loss"], 5),
    }
    atomic_write_text(cell / "result.json", json.dumps(result, indent=1) + "\n")
    return result


def distillation_loss(pooled_weight: float):
    """The cosine distance of the last hidden states per token, plus ``pooled_weight`` times
    that of their mean over the tokens (the sentence embeddings)."""
    tokens = hidden_state_loss("cosine")
    if not pooled_weight:
        return tokens
    pooled = hidden_state_loss("cosine", pooling="mean")
    return lambda student, teacher, batch: (tokens(student, teacher, batch)
                                            + pooled_weight * pooled(student, teacher, batch))


def budget(args: argparse.Namespace) -> dict:
    """What every cell of one table must share: the distillation budget and the text."""
    return {k: getattr(args, k) for k in BUDGET}


def finished_cells(cells: Path, expected: dict) -> dict[str, dict]:
    """Every finished cell under ``cells`` (earlier runs' too, so that the table covers all
    ratios and methods run so far), each checked to have had ``expected``'s budget."""
    found = {}
    for path in sorted(cells.glob("*/result.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        had = result.get("budget")
        if isinstance(had, dict):
            had = {**RECORDED_BEFORE, **had}
        if had != expected:
            sys.exit(f"{path.parent} was distilled with {had}, this run asks for {expected}: "
                     "rerun with that budget or write this one to another --out")
        found[path.parent.name] = result
    return found


def timing_model(cell: Path) -> nn.Module:
    """The cell's distilled model, or, where it is not on this machine (the saved models are
    not committed), the original with its plan's layers and untrained factors: the same
    computation, so the same latency."""
    if (cell / "model").is_dir():
        return gkpd.load(cell / "model", load_minilm()[1])
    plan = gkpd.CompressionPlan.load(cell / "plan.json")
    return gkpd.apply_(load_minilm()[1], plan, decompose=False)


def latencies(models: dict[str, nn.Module], batch: dict, rounds: int, warmup: int) -> dict:
    """Median milliseconds of each model on ``batch``, timed round by round side by side."""
    for model in models.values():
        model.eval()
    calls = {name: (lambda m=model: m(**batch)) for name, model in models.items()}
    seconds = time_interleaved(calls, rounds=rounds, warmup=warmup)
    return {name: round(1000 * s, 2) for name, s in seconds.items()}


def arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/transformer_minilm"))
    parser.add_argument("--methods", default="gkpd,svd,tucker,tensor_train")
    parser.add_argument("--ratios", default="2,4")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=0.05, help="share of the steps")
    parser.add_argument("--feature-weight", type=float, default=0.2)
    parser.add_argument("--pooled-weight", type=float, default=0.0,
                        help="weight of the mean-pooled embeddings' cosine distance in the loss")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--held-out", type=float, default=0.1, help="share of the documents")
    parser.add_argument("--max-held-out", type=int, default=1000)
    parser.add_argument("--latency-rounds", type=int, default=10)
    parser.add_argument("--latency-warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration-documents", type=int, default=512,
                        help="train documents a data-aware variant (gkpd-whiten) whitens on")
    parser.add_argument("--fortunes", type=Path, default=FORTUNES)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    for name in ("steps", "checkpoint_every", "batch_size", "max_length", "max_held_out",
                 "latency_rounds", "threads", "calibration_documents"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps % args.checkpoint_every:
        parser.error("--steps must be a multiple of --checkpoint-every")
    if not args.pooled_weight >= 0:
        parser.error("--pooled-weight must be >= 0")
    if not 0 < args.held_out < 1:
        parser.error("--held-out must be in (0, 1)")
    if any(not r > 1 for r in args.ratios):
        parser.error("--ratios must be > 1")
    for method in args.methods:
        try:
            get_method(base_method(method))
        except (ValueError, ImportError) as error:
            parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer, teacher = load_minilm()
    data = text_data(tokenizer, teacher, args.fortunes, args.held_out, args.max_length,
                     args.max_held_out, args.calibration_documents)
    probe = nn.Linear(teacher.config.hidden_size, teacher.config.intermediate_size)
    skipped = {m: reason for m in args.methods
               if (reason := get_method(base_method(m)).supports(probe))}
    finished_cells(args.out / "cells", budget(args))  # refuse a mixed table before hours of work
    for method in (m for m in args.methods if m not in skipped):
        for ratio in args.ratios:
            cell = args.out / "cells" / f"{method}-{ratio:g}x"
            if (cell / "result.json").is_file():
                print(f"{cell.name}: done before, skipped", flush=True)
                continue
            result = run_cell(args, method, ratio, teacher, data, cell)
            print(f"{cell.name}: cosine {result['cosine_before']:.4f} -> {result['cosine']:.4f}, "
                  f"{result['params']:,} params", flush=True)
    cells = finished_cells(args.out / "cells", budget(args))

    models = {"dense": teacher}
    for name in cells:
        models[name] = timing_model(args.out / "cells" / name)
    shape_batch = dict(tokenizer(data["held_out_texts"][: LATENCY_SHAPE[0]], padding="max_length",
                                 truncation=True, max_length=LATENCY_SHAPE[1],
                                 return_tensors="pt"))
    timed = latencies(models, shape_batch, args.latency_rounds, args.latency_warmup)
    rows = [{**{k: cells[n][k] for k in ("method", "ratio", "params", "cosine")},
             "latency_ms": timed[n],
             **{k: v for k, v in cells[n].items() if k not in ("method", "ratio", "params",
                                                                "cosine")}}
            for n in cells]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(rows, indent=1) + "\n")
    run = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dense": {"params": parameters(teacher),
                  "encoder_linear_params": encoder_linear_params(teacher),
                  "latency_ms": timed["dense"]},
        "skipped": skipped,
        "documents": data["documents"],
        "latency_shape": list(LATENCY_SHAPE),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu": cpu_model()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(args.out / "run.json", json.dumps(run, indent=1) + "\n")
    for row in rows:
        print(f"{row['method']:>13} {row['ratio']:g}x  params {row['params']:>10,}  "
              f"cosine {row['cosine']:.4f}  {row['latency_ms']:.1f} ms")
    print(f"{'dense':>13}     params {run['dense']['params']:>10,}  cosine 1.0000  "
          f"{timed['dense']:.1f} ms")


if __name__ == "__main__":
    main()
