"""``gkpd summary``: per-layer parameters and MACs of a model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gkpd.cli.common import MODEL_HELP, emit, positive_int


def run(args: argparse.Namespace) -> int:
    from gkpd.io import PLAN_FILE, is_saved_model
    from gkpd.models.cards import example_input
    from gkpd.plan.schema import CompressionPlan
    from gkpd.report import summary
    from gkpd.resolve import resolve_model
    from gkpd.runtime import describe_allocator, describe_openmp

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
            f"parameters: {result['ratio']:.2f}x; runs in {plan.layout}"
        )
        result["layout"] = plan.layout
    if card.get("test_accuracy") is not None:
        result["test_accuracy"] = card["test_accuracy"]
        text += f"\ntest accuracy on {card.get('dataset', '?')}: {card['test_accuracy']:.2f}%"
    # the allocator and OpenMP's wait policy set how fast the model runs on CPU (gkpd.runtime)
    result["allocator"] = describe_allocator()
    result["openmp"] = describe_openmp()
    text += f"\nallocator: {result['allocator']}\nOpenMP: {result['openmp']}"
    emit(args, result, text)
    return 0


def add_parser(sub, **kwargs) -> None:
    p = sub.add_parser(
        "summary",
        help="per-layer parameters and MACs of a model",
        description="Run the model once on an input of its card's size and list every conv, "
        "linear and Kronecker layer with its parameters and MACs.",
        **kwargs,
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1,
        help="batch size of the example input (MACs scale with it)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=run)
