"""``gkpd finetune``: fine-tune a compressed model, with distillation from its teacher."""

from __future__ import annotations

import argparse
from pathlib import Path

from gkpd.cli.common import (
    MODEL_HELP,
    CliError,
    check_out,
    command_line,
    common_args,
    data_args,
    distillation_args,
    emit,
    fine_tuning_loaders,
    log,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resumable,
    training_run,
)


def _teacher_spec(args: argparse.Namespace, card: dict) -> str | None:
    """The teacher's MODEL spec: --teacher, or the one the card records."""
    return args.teacher or (card.get("teacher") or {}).get("model")


def _teacher(args: argparse.Namespace, card: dict):
    """(teacher model or None, its MODEL spec): --teacher, or the one the card records."""
    from gkpd.resolve import resolve_model

    teacher_spec = _teacher_spec(args, card)
    if args.no_distill:
        return None, teacher_spec
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
    return teacher, teacher_spec


def run(args: argparse.Namespace) -> int:

    from gkpd.io import PLAN_FILE, is_saved_model, save
    from gkpd.methods import finetune_lr
    from gkpd.models.cards import finetuned_card, read_card
    from gkpd.plan.schema import CompressionPlan
    from gkpd.resolve import resolve_model
    from gkpd.train import distributed
    from gkpd.train.finetune import finetune

    source = Path(args.model)
    if args.feature_layers and args.no_distill:
        raise CliError("--feature-layers distils the teacher's modules: drop --no-distill")
    if not is_saved_model(source):
        raise CliError(
            f"DIR {source} is not a compressed model written by `gkpd compress` (no {PLAN_FILE})"
        )
    out = Path(args.out)
    # --out may be neither DIR nor the teacher's directory (--force would write over them)
    teacher_spec = _teacher_spec(args, read_card(source) or {})
    check_out(out, force=args.force, inputs=[args.model] + ([teacher_spec] if teacher_spec else []),
              resume=args.resume)
    student, card = resolve_model(args.model)
    plan = CompressionPlan.load(source / PLAN_FILE)
    if args.lr is None:
        args.lr = finetune_lr([plan.method, *(entry.method for entry in plan.layers)])
        log.info("fine-tuning at lr %g, the learning rate of the plan's methods (--lr to set "
                 "another)", args.lr)
    teacher, teacher_spec = _teacher(args, card)
    train_loader, test_loader = fine_tuning_loaders(args, card, "fine-tuning")
    with resumable(out, resume=args.resume, force=args.force):
        history = finetune(
            student,
            teacher,
            train_loader,
            **training_run(args, out, test_loader),
            alpha=args.alpha,
            temperature=args.temperature,
            feature_layers=args.feature_layers,
            feature_weight=args.feature_weight,
        )
    final = history[-1]
    new_card = finetuned_card(
        card,
        {
            "source": str(source.resolve()),
            "teacher": None if args.no_distill else teacher_spec,
            "distillation": not args.no_distill,
            "alpha": args.alpha,
            "temperature": args.temperature,
            "feature_layers": args.feature_layers,
            "feature_weight": args.feature_weight,
            "epochs": args.epochs,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "train_subset": args.train_subset,
            "seed": args.seed,
            "history": history,
        },
        command=command_line(),
    )
    if not distributed.is_main_process():  # under torchrun, one process writes and reports
        return 0
    save(out, student.cpu(), plan, card=new_card)
    result = {
        "out": str(out),
        "epochs": len(history),
        "test_accuracy": final["eval_accuracy"],
        "teacher_test_accuracy": (card.get("teacher") or {}).get("test_accuracy"),
        "distillation": not args.no_distill,
    }
    emit(
        args,
        result,
        f"fine-tuned {source} for {len(history)} epochs"
        f"{'' if args.no_distill else f' with distillation from {teacher_spec}'}: "
        f"test accuracy {final['eval_accuracy']:.2f}%; written to {out}",
    )
    return 0


def add_parser(sub, **kwargs) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a compressed model, with distillation from its teacher",
        description="Fine-tune a model written by `gkpd compress` with knowledge distillation "
        "from the dense teacher (on by default); checkpoints after every epoch in --out, "
        "--resume continues; the result is written to --out with gkpd.save.",
        **kwargs,
    )
    p.add_argument("model", metavar="DIR", help="a directory written by gkpd compress")
    p.add_argument(
        "--teacher",
        default=None,
        metavar="MODEL",
        help="the dense teacher (default: the one recorded by gkpd compress); " + MODEL_HELP,
    )
    data_args(p)
    p.add_argument("--epochs", type=positive_int, required=True)
    p.add_argument("--out", required=True, help="directory for checkpoints and the result")
    distillation_args(p)
    p.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="learning rate (default: the one the plan's methods fine-tune best at: 0.01, "
        "or 0.001 where a layer is cp, whose factors are thrown off by larger steps)",
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument(
        "--no-distill", action="store_true", help="plain cross-entropy fine-tuning, no teacher"
    )
    p.add_argument(
        "--train-subset",
        type=positive_int,
        default=None,
        metavar="N",
        help="train on N randomly drawn training samples per epoch, a fresh draw each "
        "epoch (default: all of them)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="data loader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out that already holds a run or a model",
    )
    common_args(p)
    p.set_defaults(handler=run)
