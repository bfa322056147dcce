"""``gkpd bench accuracy``: several compression methods at several ratios, fine-tuned alike
(:mod:`gkpd.bench`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gkpd.cli.bench import types
from gkpd.cli.common import (
    CliError,
    Interrupted,
    common_args,
    data_args,
    distillation_args,
    emit,
    fine_tuning_loaders,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)


def run(args: argparse.Namespace) -> int:

    from gkpd import data
    from gkpd.bench import AccuracyConfig, known_methods, run_accuracy
    from gkpd.bench.campaign import RESULTS_MD as CAMPAIGN_MD
    from gkpd.bench.campaign import seed_dir, write_campaign
    from gkpd.bench.report import RESULTS_MD, require_matplotlib
    from gkpd.bench.variants import needs_calibration
    from gkpd.models.cards import example_input
    from gkpd.resolve import resolve_model

    unknown = [m for m in args.methods if m not in known_methods()]
    if unknown:
        raise CliError(
            f"--methods: unknown {', '.join(unknown)}; expected some of "
            f"{', '.join(known_methods())}"
        )
    if args.seeds is not None and args.seed != 0:
        raise CliError("give either --seed or --seeds")
    seeds = args.seeds if args.seeds is not None else [args.seed]
    config = AccuracyConfig(
        methods=tuple(args.methods),
        ratios=tuple(args.ratios),
        epochs=args.epochs,
        train_subset=args.train_subset,
        batch_size=args.batch_size,
        lr=args.lr,
        student_lr=args.student_lr,
        weight_decay=args.weight_decay,
        alpha=args.alpha,
        temperature=args.temperature,
        feature_layers=None if args.feature_layers is None else tuple(args.feature_layers),
        feature_weight=args.feature_weight,
        seed=args.seed,
        latency_threads=args.latency_threads,
    )
    config.validate()
    if not args.no_plot:
        require_matplotlib()
    teacher, card = resolve_model(args.model)
    if card.get("compression"):
        raise CliError(f"MODEL {args.model} is already compressed; give the dense model")
    train_loader, test_loader = fine_tuning_loaders(args, card, "benchmarking")
    calibration = None
    if any(needs_calibration(m) for m in args.methods):
        calibration = data.sample_inputs(args.data, args.calibration, args.data_dir)
    source = Path(args.model)
    try:
        for seed in seeds:
            out = Path(args.out) if args.seeds is None else seed_dir(args.out, seed)
            results = run_accuracy(
                teacher,
                example_input(card),
                train_loader=train_loader,
                test_loader=test_loader,
                config=dataclasses.replace(config, seed=seed),
                out=out,
                card=card,
                context={
                    "model": str(source.resolve()) if source.exists() else args.model,
                    "data": args.data,
                    # another copy of the data (another test set) is another benchmark; the
                    # default directory is left unrecorded, as runs before this recorded it
                    **({} if args.data_dir is None
                       else {"data_dir": str(Path(args.data_dir).resolve())}),
                },
                reference=args.reference,
                reference_source=args.reference_source,
                plot=not args.no_plot and args.seeds is None,
                device=args.device,
                progress=not args.no_progress,
                calibration=calibration,
            )
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted; finished cells are kept and an unfinished one resumes from its "
            "last epoch's checkpoint: run the same command again"
        ) from None
    if args.seeds is not None:
        results = write_campaign(args.out, train_size=len(train_loader.dataset),
                                 plot=not args.no_plot)
        text = (Path(args.out) / CAMPAIGN_MD).read_text(encoding="utf-8")
        failed = results["failed"]
    else:
        text = (Path(args.out) / RESULTS_MD).read_text(encoding="utf-8")
        failed = [c for c in results["cells"] if c.get("status") != "ok"]
    text += f"\nwritten to {args.out}" + (f" ({len(failed)} cell(s) failed)" if failed else "")
    emit(args, results, text)
    return 0


def add_parser(bench, **kwargs) -> None:
    p = bench.add_parser(
        "accuracy",
        help="accuracy of several compression methods at several ratios, same fine-tuning",
        description="Compress MODEL with each method at each ratio, fine-tune every result "
        "with the same budget and the same distillation from MODEL, and write results.md, "
        "results.json and pareto.png to --out. Each (method, ratio) cell has its own "
        "directory; a finished cell is not run again, an interrupted one resumes from its "
        "checkpoint, so running the same command again prints the table. Method 'student' "
        "is a narrower dense network of MODEL's family with about the compressed parameter "
        "count, trained from random weights by distillation with the same budget.",
        **kwargs,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="the trained dense model: a zoo name with shipped weights (e.g. "
        "resnet32_fashion_mnist), a directory written by gkpd train, or a checkpoint.pt",
    )
    data_args(p)
    p.add_argument(
        "--methods",
        type=types.names,
        required=True,
        help="comma-separated compression methods (gkpd.methods.method_names()) and/or "
        "'student', e.g. gkpd,svd,tucker,student",
    )
    p.add_argument(
        "--ratios", type=types.ratios, required=True, help="comma-separated ratios > 1, e.g. 5,10"
    )
    p.add_argument("--epochs", type=positive_int, required=True, help="fine-tuning epochs")
    p.add_argument(
        "--train-subset",
        type=positive_int,
        default=None,
        metavar="N",
        help="N randomly drawn training samples per epoch, a fresh draw each epoch "
        "(default: all of them)",
    )
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.01, help="fine-tuning learning rate")
    p.add_argument(
        "--student-lr",
        type=positive_float,
        default=0.1,
        help="learning rate of the 'student', which starts from random weights",
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    distillation_args(p)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument(
        "--seeds",
        type=types.seeds,
        default=None,
        metavar="S,...",
        help="a campaign: every cell once per seed, in --out/seedS, and results.json (one row "
        "per method x ratio x seed), results.md (mean +- sd) and accuracy.png in --out",
    )
    p.add_argument(
        "--calibration",
        type=positive_int,
        default=512,
        metavar="N",
        help="training images (a fixed draw, not augmented) that the data-aware gkpd "
        "variants (gkpd-whiten...) whiten on",
    )
    p.add_argument(
        "--latency-threads",
        type=positive_int,
        default=1,
        help="torch threads while timing batch-1 latency (default 1)",
    )
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="data loader worker processes")
    p.add_argument("--out", required=True, help="directory for the cells, table and plot")
    p.add_argument(
        "--reference",
        type=types.reference,
        default=None,
        metavar="METHOD=ACC,...",
        help="published accuracies shown beside ours, e.g. dense=92.55,gkpd=91.52",
    )
    p.add_argument("--reference-source", default=None, help="where --reference comes from")
    p.add_argument("--no-plot", action="store_true", help="skip pareto.png (needs matplotlib)")
    common_args(p)
    p.set_defaults(handler=run)
