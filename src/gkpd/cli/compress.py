"""``gkpd compress``: plan and apply a compression of a trained model, then save it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gkpd.cli.common import (
    MODEL_HELP,
    CliError,
    check_data,
    check_out,
    command_line,
    emit,
    log,
    model_dir,
    positive_float,
    positive_int,
    slack,
)
from gkpd.layout import LAYOUTS
from gkpd.plan.budget import STRATEGIES


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


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of :func:`gkpd.apply.compress` that the arguments ask for."""
    options: dict[str, Any] = {
        "ratio": args.ratio,
        "method": args.method,
        "strategy": args.strategy,
    }
    if args.include:
        options["include"] = args.include
    if args.exclude:
        options["exclude"] = args.exclude
    if args.min_params is not None:
        options["min_params"] = args.min_params
    if args.allow_more_macs:
        options["allow_more_macs"] = True
    if args.max_layer_error is not None:
        options["max_layer_error"] = args.max_layer_error
    if args.channels_last and args.layout not in ("auto", "channels_last"):
        raise CliError(f"--channels-last contradicts --layout {args.layout}")
    options["layout"] = "channels_last" if args.channels_last else args.layout
    if args.objective == "latency":
        from gkpd.plan.objective import LatencyObjective

        objective = {"batch": args.latency_batch}
        if args.latency_slack is not None:
            objective["slack"] = args.latency_slack
        if args.latency_max_seconds is not None:
            objective["max_seconds"] = args.latency_max_seconds
        options["objective"] = LatencyObjective(**objective)
    elif (args.latency_batch is not None or args.latency_slack is not None
          or args.latency_max_seconds is not None):
        raise CliError("--latency-batch, --latency-slack and --latency-max-seconds need "
                       "--objective latency")
    return options


def _calibration(args: argparse.Namespace, card: dict[str, Any]):
    """``--calibration N`` training images of ``--data`` (default: the model's data set)."""
    from gkpd import data
    from gkpd.calibration import Calibration
    from gkpd.methods import data_aware_methods

    name = args.data or card.get("dataset")
    if name is None:
        raise CliError("--calibration needs --data: MODEL's card names no data set")
    if args.method not in data_aware_methods():
        raise CliError(f"--calibration is used by --method {' or '.join(data_aware_methods())} "
                       f"only, got {args.method}")
    check_data(card, name, "calibrating")
    images = data.sample_inputs(name, args.calibration, args.data_dir)
    return Calibration(images, samples=args.calibration, select=args.calibration_select,
                       sequential=args.calibration_sequential)


def run(args: argparse.Namespace) -> int:
    from gkpd.apply import compress
    from gkpd.io import is_saved_model, save
    from gkpd.models.cards import compressed_card, example_input
    from gkpd.resolve import resolve_model

    out = Path(args.out)
    check_out(out, force=args.force, inputs=[args.model])
    if is_saved_model(args.model):
        raise CliError(
            f"MODEL {args.model} is already compressed; compress the dense model it came from"
        )
    model, card = resolve_model(args.model)
    x = example_input(card)
    options = _options(args)
    if args.calibration < 0:
        raise CliError(f"--calibration must be a number of images >= 0, got {args.calibration}")
    if args.calibration:
        options["calibration"] = _calibration(args, card)
    elif args.calibration_select or args.calibration_sequential or args.data:
        raise CliError("--data, --calibration-select and --calibration-sequential need "
                       "--calibration N")
    log.info("planning %s at %gx (%s, strategy %s)", args.model, args.ratio, args.method,
             args.strategy or "uniform, else near_uniform")
    compressed, plan = compress(model, x, **options)
    source = model_dir(args.model)
    new_card = compressed_card(
        card,
        plan,
        teacher=str(source) if source is not None else args.model,
        include=args.include,
        exclude=args.exclude,
        command=command_line(),
    )
    save(out, compressed, plan, card=new_card)
    result = {
        "out": str(out),
        "model": args.model,
        **plan.totals(),
    }
    emit(args, result, f"{plan.table()}\nwritten to {out}")
    return 0


def _selection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="gkpd", help="compression method (default: gkpd)")
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default=None,
        help="uniform: every layer at the same ratio (the paper); near_uniform: the largest "
        "uniform plan within the budget, topped up where the error falls most; global: "
        "minimize the summed relative squared error (default: uniform, or near_uniform where "
        "uniform's rank steps miss the ratio, or global where that misses it too)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        default=None,
        help="compress only these layers: layer type (Conv2d), name of a layer or of a module "
             "holding layers, or re:REGEX; repeatable",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        default=None,
        help="keep these layers dense: layer type, name of a layer or of a module holding layers, "
             "or re:REGEX; repeatable",
    )
    p.add_argument("--min-params", type=_count, default=None, metavar="N",
                   help="keep layers with fewer than N weights dense (default: 1024)")
    p.add_argument("--allow-more-macs", action="store_true",
                   help="also offer configurations that cost more MACs than their dense layer")
    p.add_argument("--max-layer-error", type=float, default=None, metavar="E",
                   help="keep dense the layers that would keep too little of their weight: no "
                   "configuration with relative error >= E (e.g. 0.95) is offered")


def _calibration_args(p: argparse.ArgumentParser) -> None:
    from gkpd.data import dataset_names

    p.add_argument(
        "--calibration", type=int, default=0, metavar="N",
        help="data-aware factors (--method gkpd or svd): whiten each layer's factors on N "
        "training images (a fixed, not augmented draw; 0: plain factors)",
    )
    p.add_argument("--data", default=None, choices=dataset_names(),
                   help="data set of --calibration (default: the one MODEL was trained on)")
    p.add_argument("--data-dir", default=None, help="directory of that data set")
    p.add_argument("--calibration-select", action="store_true",
                   help="also rank factor shapes and ranks by the output error on those images "
                   "(measured worse on ResNet-32: see benchmarks/RESULTS.md)")
    p.add_argument("--calibration-sequential", action="store_true",
                   help="fit each layer to the original outputs from the inputs that the "
                   "layers compressed before it produce")


def _latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--objective",
        choices=["error", "latency"],
        default="error",
        help="error: the most accurate configuration per layer; latency (gkpd only): time "
        "the configurations on this machine and keep the fastest within --latency-slack",
    )
    p.add_argument("--latency-batch", type=positive_int, default=None,
                   help="batch size to time at (default: 1)")
    p.add_argument("--latency-slack", type=slack, default=None,
                   help="accept configurations whose error is up to 1+SLACK times the most "
                   "accurate one's (default: 0.1)")
    p.add_argument("--latency-max-seconds", type=positive_float, default=None,
                   help="stop timing after this many seconds: layers not timed by then keep "
                   "the most accurate configuration (default: no limit)")
    p.add_argument("--layout", choices=["auto", *LAYOUTS], default="auto",
                   help="the memory layout the compressed model runs in (it converts its "
                   "inputs): auto times NCHW (contiguous) and channels_last on this machine "
                   "and keeps the faster")
    p.add_argument("--channels-last", action="store_true",
                   help="the same as --layout channels_last (kept for old scripts)")


def add_parser(sub, **kwargs) -> None:
    p = sub.add_parser(
        "compress",
        help="compress a trained model to a target ratio",
        description="Plan and apply a GKPD compression of a trained model, print the plan, "
        "and write the compressed model (gkpd.save) to --out.",
        **kwargs,
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument(
        "--ratio",
        type=_ratio,
        required=True,
        help="whole-model compression ratio: dense parameters / compressed parameters (> 1)",
    )
    _selection_args(p)
    _latency_args(p)
    _calibration_args(p)
    p.add_argument("--out", required=True, help="directory for the compressed model")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=run)
