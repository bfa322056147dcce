"""``gkpd compress``, ``gkpd finetune`` and ``gkpd summary``: the compression subcommands.

Each handler resolves its MODEL with :func:`gkpd.cli.resolve_model`, calls the library
(``gkpd.apply.compress``, ``gkpd.train.fit``, ``gkpd.report.summary``) and writes with
:func:`gkpd.io.save`.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gkpd.cli import CliError, _common_args, _data_args, _emit, _positive_int, resolve_model

log = logging.getLogger("gkpd")

# card keys that describe the dense architecture and its data; carried from teacher to student
CARRIED_KEYS = ("architecture", "model_kwargs", "dataset", "normalization", "input_size")


def _slack(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 1, got {text!r}") from None
    if not value > 1:
        raise argparse.ArgumentTypeError(
            f"must be > 1 (dense parameters / compressed parameters), got {text}"
        )
    return value


def _command_line() -> str:
    return "gkpd " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def example_input(card: dict[str, Any], batch: int = 1):
    """A batch of zeros of the card's ``input_size`` (channels, *spatial)."""
    import torch

    size = card.get("input_size")
    if not isinstance(size, list) or not size or not all(isinstance(s, int) for s in size):
        raise CliError(
            "the model's card has no 'input_size' (channels, height, width); cannot build an "
            "example input"
        )
    return torch.zeros(batch, *size)


def _model_dir(spec: str) -> Path | None:
    path = Path(spec)
    return path.resolve() if path.exists() else None


def _check_out(out: Path, *, force: bool, inputs: list[str], resume: bool = False) -> None:
    """Refuse an --out that is an input, is a file, or already holds a model or a run."""
    from gkpd.io import is_saved_model
    from gkpd.models.pretrained import WEIGHTS_FILE
    from gkpd.train.loop import CHECKPOINT_NAME

    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    for spec in inputs:
        source = _model_dir(spec)
        if source is not None and source in (out.resolve(), out.resolve() / WEIGHTS_FILE):
            raise CliError(f"--out {out} is an input of this command; pick another directory")
    if resume or force:
        return
    if (out / CHECKPOINT_NAME).exists():
        raise CliError(
            f"--out {out} already holds a training run; pass --resume to continue it, "
            "--force to start over, or pick another directory"
        )
    if is_saved_model(out) or (out / WEIGHTS_FILE).exists():
        raise CliError(
            f"--out {out} already holds a model; pass --force to replace it or pick another "
            "directory"
        )


# ----------------------------------------------------------------------------- compress


def _cmd_compress(args: argparse.Namespace) -> int:
    import torch

    from gkpd.apply import compress
    from gkpd.io import is_saved_model, save

    out = Path(args.out)
    _check_out(out, force=args.force, inputs=[args.model])
    if is_saved_model(args.model):
        raise CliError(
            f"MODEL {args.model} is already compressed; compress the dense model it came from"
        )
    model, card = resolve_model(args.model)
    x = example_input(card)
    options: dict[str, Any] = {
        "ratio": args.ratio,
        "method": args.method,
        "strategy": args.strategy,
    }
    if args.include:
        options["include"] = args.include
    if args.exclude:
        options["exclude"] = args.exclude
    if args.objective == "latency":
        options.update(objective="latency", latency_batch=args.latency_batch,
                       latency_channels_last=args.channels_last)
        if args.latency_slack is not None:
            options["latency_slack"] = args.latency_slack
    elif args.latency_batch is not None or args.latency_slack is not None or args.channels_last:
        raise CliError("--latency-batch, --latency-slack and --channels-last need "
                       "--objective latency")
    log.info("planning %s at %gx (%s, %s)", args.model, args.ratio, args.method, args.strategy)
    compressed, plan = compress(model, x, **options)
    source = _model_dir(args.model)
    new_card: dict[str, Any] = {k: card[k] for k in CARRIED_KEYS if k in card}
    new_card["compression"] = {
        "method": plan.method,
        "strategy": plan.strategy,
        "target_ratio": plan.target_ratio,
        "achieved_ratio": plan.achieved_ratio,
        "dense_params": plan.dense_params,
        "params": plan.params,
        "dense_macs": plan.dense_macs,
        "macs": plan.macs,
        "compressed_layers": len(plan.compressed_layers),
        "layers": len(plan.layers),
        "include": args.include or [],
        "exclude": args.exclude or [],
        "objective": plan.objective,
        **{k: v for k, v in plan.options.items() if k.startswith("latency_")},
    }
    new_card["teacher"] = {
        "model": str(source) if source is not None else args.model,
        "architecture": card.get("architecture"),
        "test_accuracy": card.get("test_accuracy"),
    }
    new_card["command"] = _command_line()
    new_card["created"] = _now()
    new_card["torch_version"] = torch.__version__
    save(out, compressed, plan, card=new_card)
    result = {
        "out": str(out),
        "model": args.model,
        "method": plan.method,
        "strategy": plan.strategy,
        "target_ratio": plan.target_ratio,
        "achieved_ratio": plan.achieved_ratio,
        "dense_params": plan.dense_params,
        "params": plan.params,
        "dense_macs": plan.dense_macs,
        "macs": plan.macs,
        "compressed_layers": len(plan.compressed_layers),
    }
    _emit(args, result, f"{plan.table()}\nwritten to {out}")
    return 0


# ----------------------------------------------------------------------------- finetune


def _train_loader(args: argparse.Namespace):
    from gkpd.train.finetune import finetune_loader

    return finetune_loader(
        args.data,
        args.data_dir,
        batch_size=args.batch_size,
        train_subset=args.train_subset,
        workers=args.workers,
    )


def _cmd_finetune(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from gkpd import data
    from gkpd.io import PLAN_FILE, is_saved_model, save
    from gkpd.plan.schema import CompressionPlan
    from gkpd.train.finetune import finetune

    source = Path(args.model)
    if not is_saved_model(source):
        raise CliError(
            f"DIR {source} is not a compressed model written by `gkpd compress` (no {PLAN_FILE})"
        )
    out = Path(args.out)
    _check_out(out, force=args.force, inputs=[args.model], resume=args.resume)
    student, card = resolve_model(args.model)
    plan = CompressionPlan.load(source / PLAN_FILE)
    teacher = None
    teacher_spec = args.teacher or (card.get("teacher") or {}).get("model")
    if not args.no_distill:
        if not teacher_spec:
            raise CliError("pass --teacher MODEL (the card of DIR names none), or --no-distill")
        teacher, teacher_card = resolve_model(teacher_spec)
        if teacher_card.get("architecture") != card.get("architecture"):
            log.warning(
                "teacher %s is a %s, the student was compressed from a %s",
                teacher_spec,
                teacher_card.get("architecture"),
                card.get("architecture"),
            )
    info = data.get_info(args.data)
    if card.get("dataset") not in (None, args.data):
        log.warning("model was trained on %s, fine-tuning on %s", card["dataset"], args.data)
    norm = card.get("normalization")
    if norm and (tuple(norm["mean"]), tuple(norm["std"])) != (info.mean, info.std):
        log.warning("model was trained with normalization %s; %s uses %s", norm, args.data, info)
    train_loader = _train_loader(args)
    test = data.build_dataset(args.data, "test", args.data_dir, augment=False)
    test_loader = DataLoader(test, batch_size=512, num_workers=args.workers)
    history = finetune(
        student,
        teacher,
        train_loader,
        epochs=args.epochs,
        eval_loader=test_loader,
        checkpoint_dir=out,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
        lr=args.lr,
        weight_decay=args.weight_decay,
        alpha=args.alpha,
        temperature=args.temperature,
        seed=args.seed,
    )
    final = history[-1]
    new_card = {k: card[k] for k in CARRIED_KEYS if k in card}
    for key in ("compression", "teacher"):
        if key in card:
            new_card[key] = card[key]
    new_card["finetune"] = {
        "source": str(source.resolve()),
        "teacher": None if args.no_distill else teacher_spec,
        "distillation": not args.no_distill,
        "alpha": args.alpha,
        "temperature": args.temperature,
        "epochs": args.epochs,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "train_subset": args.train_subset,
        "seed": args.seed,
        "history": history,
    }
    new_card["test_accuracy"] = final["eval_accuracy"]
    new_card["command"] = _command_line()
    new_card["created"] = _now()
    new_card["torch_version"] = torch.__version__
    save(out, student.cpu(), plan, card=new_card)
    result = {
        "out": str(out),
        "epochs": len(history),
        "test_accuracy": final["eval_accuracy"],
        "teacher_test_accuracy": (card.get("teacher") or {}).get("test_accuracy"),
        "distillation": not args.no_distill,
    }
    _emit(
        args,
        result,
        f"fine-tuned {source} for {len(history)} epochs"
        f"{'' if args.no_distill else f' with distillation from {teacher_spec}'}: "
        f"test accuracy {final['eval_accuracy']:.2f}%; written to {out}",
    )
    return 0


# ----------------------------------------------------------------------------- summary


def _cmd_summary(args: argparse.Namespace) -> int:
    from gkpd.io import PLAN_FILE, is_saved_model
    from gkpd.plan.schema import CompressionPlan
    from gkpd.report import summary

    model, card = resolve_model(args.model)
    report = summary(model, example_input(card, args.batch_size))
    result: dict[str, Any] = {"model": args.model, **report.to_dict()}
    text = str(report)
    if is_saved_model(args.model):
        plan = CompressionPlan.load(Path(args.model) / PLAN_FILE)
        result["dense_params"] = plan.dense_params
        result["ratio"] = plan.dense_params / report.total_params
        text += (
            f"\ncompressed with {plan.method} ({plan.strategy}) from {plan.dense_params:,} "
            f"parameters: {result['ratio']:.2f}x"
        )
    if card.get("test_accuracy") is not None:
        result["test_accuracy"] = card["test_accuracy"]
        text += f"\ntest accuracy on {card.get('dataset', '?')}: {card['test_accuracy']:.2f}%"
    _emit(args, result, text)
    return 0


# ----------------------------------------------------------------------------- parsers


def add_parsers(sub) -> None:
    model_help = (
        "a zoo name with shipped weights (e.g. resnet32_fashion_mnist), a directory written by "
        "gkpd train or gkpd compress, or a checkpoint.pt"
    )
    p = sub.add_parser(
        "compress",
        help="compress a trained model to a target ratio",
        description="Plan and apply a GKPD compression of a trained model, print the plan, "
        "and write the compressed model (gkpd.save) to --out.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--ratio",
        type=_ratio,
        required=True,
        help="whole-model compression ratio: dense parameters / compressed parameters (> 1)",
    )
    p.add_argument("--method", default="gkpd", help="compression method (default: gkpd)")
    p.add_argument(
        "--strategy",
        choices=["uniform", "global"],
        default="uniform",
        help="uniform: every layer at the same ratio (the paper); global: "
        "minimize the summed relative squared error",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        default=None,
        help="compress only these layers: module type (Conv2d), name, or re:REGEX; repeatable",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        default=None,
        help="keep these layers dense: module type, name, or re:REGEX; repeatable",
    )
    p.add_argument(
        "--objective",
        choices=["error", "latency"],
        default="error",
        help="error: the most accurate configuration per layer; latency (gkpd only): time "
        "the configurations on this machine and keep the fastest within --latency-slack",
    )
    p.add_argument("--latency-batch", type=_positive_int, default=None,
                   help="batch size to time at (default: 1)")
    p.add_argument("--latency-slack", type=_slack, default=None,
                   help="accept configurations whose error is up to 1+SLACK times the most "
                   "accurate one's (default: 0.1)")
    p.add_argument("--channels-last", action="store_true",
                   help="time on channels_last inputs, for a model run in that memory format")
    p.add_argument("--out", required=True, help="directory for the compressed model")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_cmd_compress)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a compressed model, with distillation from its teacher",
        description="Fine-tune a model written by `gkpd compress` with knowledge distillation "
        "from the dense teacher (on by default); checkpoints after every epoch in --out, "
        "--resume continues; the result is written to --out with gkpd.save.",
    )
    p.add_argument("model", metavar="DIR", help="a directory written by gkpd compress")
    p.add_argument(
        "--teacher",
        default=None,
        metavar="MODEL",
        help="the dense teacher (default: the one recorded by gkpd compress); " + model_help,
    )
    _data_args(p)
    p.add_argument("--epochs", type=_positive_int, required=True)
    p.add_argument("--out", required=True, help="directory for checkpoints and the result")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument(
        "--no-distill", action="store_true", help="plain cross-entropy fine-tuning, no teacher"
    )
    p.add_argument(
        "--train-subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train on N randomly drawn training samples per epoch, a fresh draw each "
        "epoch (default: all of them)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out that already holds a run or a model",
    )
    _common_args(p)
    p.set_defaults(handler=_cmd_finetune)

    p = sub.add_parser(
        "summary",
        help="per-layer parameters and MACs of a model",
        description="Run the model once on an input of its card's size and list every conv, "
        "linear and Kronecker layer with its parameters and MACs.",
    )
    p.add_argument("model", metavar="MODEL", help=model_help)
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1,
        help="batch size of the example input (MACs scale with it)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_cmd_summary)
