"""The ``gkpd`` command: each subcommand mirrors a library call."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("gkpd")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(text)


def resolve_model(spec: str):
    """MODEL argument -> (model, card): a zoo name with shipped weights, a directory written by
    ``gkpd train`` or by :func:`gkpd.io.save` (rebuilt from its card, then loaded with its
    plan), or a ``checkpoint.pt`` written by ``gkpd train``."""
    from gkpd import models
    from gkpd.io import is_saved_model, load
    from gkpd.io import read_card as read_saved_card
    from gkpd.models.pretrained import CARD_FILE, WEIGHTS_FILE, load_trained, read_card
    from gkpd.train.checkpoint import check_state_dict_matches, load_state

    path = Path(spec)
    if path.is_dir() and is_saved_model(path):
        card = read_saved_card(path)
        if card is None:
            raise CliError(
                f"MODEL directory {path} was saved without a {CARD_FILE} naming its "
                "architecture; load it with gkpd.load(path, model) in Python"
            )
        model = models.create(card["architecture"], **card.get("model_kwargs", {}))
        return load(path, model), card
    if path.is_dir():
        if (path / WEIGHTS_FILE).is_file() and (path / CARD_FILE).is_file():
            return load_trained(path / WEIGHTS_FILE, path / CARD_FILE)
        if (path / "checkpoint.pt").is_file():
            path = path / "checkpoint.pt"
        else:
            raise CliError(
                f"MODEL directory {path} holds neither {WEIGHTS_FILE} + {CARD_FILE} "
                "(gkpd train's result) nor checkpoint.pt"
            )
    if path.is_file():
        card_path = path.parent / CARD_FILE
        if not card_path.is_file():
            raise CliError(
                f"checkpoint {path} has no {CARD_FILE} beside it naming its architecture"
            )
        card = read_card(card_path)
        model = models.create(card["architecture"], **card.get("model_kwargs", {}))
        state = load_state(path)
        weights = state.get("model", state)
        check_state_dict_matches(model, weights, str(path))
        model.load_state_dict(weights)
        return model.eval(), card
    if spec in models.pretrained_names():
        return models.load_pretrained(spec, with_card=True)
    raise CliError(
        f"MODEL {spec!r} is neither an existing path nor a model with shipped weights "
        f"({', '.join(models.pretrained_names()) or 'none shipped'})"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from gkpd import data, models, train
    from gkpd.models.pretrained import CARD_FILE, save_trained
    from gkpd.train.checkpoint import atomic_write_text
    from gkpd.train.loop import CHECKPOINT_NAME

    info = data.get_info(args.data)
    out = Path(args.out)
    if (out / CHECKPOINT_NAME).exists() and not args.resume:
        raise CliError(
            f"--out {out} already holds a run; pass --resume to continue it or pick another"
        )
    model_kwargs = {"num_classes": info.num_classes, "in_channels": info.in_channels}
    model = models.create(args.model, **model_kwargs)
    train_loader, test_loader = data.build_loaders(
        args.data, args.data_dir, batch_size=args.batch_size, num_workers=args.workers
    )
    card: dict[str, Any] = {
        "architecture": args.model,
        "model_kwargs": model_kwargs,
        "dataset": args.data,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "input_size": [info.in_channels, info.image_size, info.image_size],
        "epochs": args.epochs,
        "seed": args.seed,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": args.schedule,
            "label_smoothing": args.label_smoothing,
            "momentum": 0.9,
            "nesterov": True,
            "augmentation": (
                f"random crop (padding {info.crop_padding}) + horizontal flip"
                if info.crop_padding
                else "random crop while decoding + horizontal flip"
            ),
        },
        "command": "gkpd " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "torch_version": torch.__version__,
    }
    from gkpd.train import distributed

    if distributed.is_main_process():
        atomic_write_text(out / CARD_FILE, json.dumps(card, indent=2, sort_keys=True) + "\n")
    history = train.fit(
        model,
        train_loader,
        epochs=args.epochs,
        eval_loader=test_loader,
        checkpoint_dir=out,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
    )
    final = history[-1]
    card["test_accuracy"] = final["eval_accuracy"]
    card["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    if distributed.is_main_process():
        save_trained(out, model, card)
    result = {"out": str(out), "epochs": len(history), "test_accuracy": final["eval_accuracy"]}
    _emit(
        args,
        result,
        f"trained {args.model} on {args.data}: test accuracy "
        f"{final['eval_accuracy']:.2f}% after {len(history)} epochs; written to {out}",
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from gkpd import data, train

    model, card = resolve_model(args.model)
    info = data.get_info(args.data)
    norm = card.get("normalization")
    if norm and (tuple(norm["mean"]), tuple(norm["std"])) != (info.mean, info.std):
        log.warning(
            "model was trained with normalization %s; %s uses mean %s std %s",
            norm,
            args.data,
            info.mean,
            info.std,
        )
    test = data.build_dataset(args.data, "test", args.data_dir, augment=False)
    from torch.utils.data import DataLoader

    loader = DataLoader(test, batch_size=args.batch_size)
    result = train.evaluate(model, loader, device=args.device, progress=not args.no_progress)
    result = {"model": args.model, "dataset": args.data, **result}
    _emit(
        args,
        result,
        f"{args.model} on {args.data} test: accuracy {result['accuracy']:.2f}% "
        f"(loss {result['loss']:.4f}, {result['count']} samples)",
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _data_args(parser: argparse.ArgumentParser) -> None:
    from gkpd.data import dataset_names

    parser.add_argument("--data", required=True, choices=dataset_names(), help="data set")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory of the data set "
        "(default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    )


def _common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gkpd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a zoo model from scratch",
        description="Train a gkpd.models architecture on a data set.",
    )
    p.add_argument("model", metavar="MODEL_NAME", help="a gkpd.models name, e.g. resnet32")
    _data_args(p)
    p.add_argument("--epochs", type=_positive_int, required=True)
    p.add_argument("--out", required=True, help="directory for checkpoints, metrics and weights")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _common_args(p)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="test accuracy of a model",
        description="Evaluate a model on the test split of a data set.",
    )
    p.add_argument("model", metavar="MODEL", help="zoo name with shipped weights, or a directory")
    _data_args(p)
    p.add_argument("--batch-size", type=_positive_int, default=512)
    _common_args(p)
    p.set_defaults(handler=_cmd_eval)

    from gkpd.cli_compress import add_parsers

    add_parsers(sub)
    from gkpd.cli_export import add_parsers as add_export_parsers

    add_export_parsers(sub)
    from gkpd.cli_bench import add_parsers as add_bench_parsers

    add_bench_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except (CliError, ValueError, TypeError, FileNotFoundError) as error:
        print(f"gkpd {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, leave the process group cleanly: a rank that exits with gloo's threads
    alive can abort."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
