"""``gkpd eval``: test accuracy of a model on a data set."""

from __future__ import annotations

import argparse

from gkpd.cli.common import (
    check_classes,
    check_data,
    common_args,
    data_args,
    emit,
    positive_int,
)


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from gkpd import data, train
    from gkpd.resolve import resolve_model

    model, card = resolve_model(args.model)
    check_data(card, args.data, "evaluating")
    test = data.build_dataset(args.data, "test", args.data_dir, augment=False)
    check_classes(card, test, args.data)
    loader = DataLoader(test, batch_size=args.batch_size)
    result = train.evaluate(model, loader, device=args.device, progress=not args.no_progress)
    result = {"model": args.model, "dataset": args.data, **result}
    emit(
        args,
        result,
        f"{args.model} on {args.data} test: accuracy {result['accuracy']:.2f}% "
        f"(loss {result['loss']:.4f}, {result['count']} samples)",
    )
    return 0


def add_parser(sub, **kwargs) -> None:
    p = sub.add_parser(
        "eval",
        help="test accuracy of a model",
        description="Evaluate a model on the test split of a data set.",
        **kwargs,
    )
    p.add_argument("model", metavar="MODEL", help="zoo name with shipped weights, or a directory")
    data_args(p)
    p.add_argument("--batch-size", type=positive_int, default=512)
    common_args(p)
    p.set_defaults(handler=run)
