"""``gkpd bench campaign``: the summary of an accuracy campaign that spans several directories
of seeds, one per learning rate (:func:`gkpd.bench.campaign.write_campaign`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gkpd.cli.common import CliError, common_args, emit, positive_int


def run(args: argparse.Namespace) -> int:
    from gkpd.bench.campaign import RESULTS_MD, write_campaign

    missing = [c for c in args.cells if not Path(c).is_dir()]
    if missing:
        raise CliError(f"CELLS: {', '.join(missing)} is not a directory")
    try:
        results = write_campaign(
            args.out, cells=args.cells, train_size=args.train_size, plot=not args.no_plot
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    text = (Path(args.out) / RESULTS_MD).read_text(encoding="utf-8")
    emit(args, results, text + f"\nwritten to {args.out}")
    return 0


def add_parser(bench, **kwargs) -> None:
    p = bench.add_parser(
        "campaign",
        help="summarize accuracy campaigns run at several learning rates",
        description="Collect the finished cells of one or more campaign directories (each "
        "holding seedN/ directories written by `gkpd bench accuracy --seed N`), which may "
        "differ in nothing but the learning rate, and write results.json (one row per method "
        "x ratio x seed x lr), results.md (each method at the learning rate where its mean is "
        "highest, then every learning rate) and accuracy.png to --out.",
        **kwargs,
    )
    p.add_argument("cells", nargs="+", metavar="CELLS", help="campaign directories")
    p.add_argument("--out", required=True, help="directory for results.json/.md and the plot")
    p.add_argument(
        "--train-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="the training split's size, recorded as the per-epoch sample count of cells "
        "fine-tuned on all of it (60000 for Fashion-MNIST)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip accuracy.png (needs matplotlib)")
    common_args(p)
    p.set_defaults(handler=run)
