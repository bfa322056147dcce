"""``gkpd bench``: benchmarks that compare compression methods.

``gkpd bench accuracy`` compresses one model with several methods at several ratios,
fine-tunes each the same way and writes a table and a Pareto plot (:mod:`gkpd.bench`).
``gkpd bench speed`` times the dense model, GKPD and TensorLy-Torch's factorizations on this
machine's CPU (:mod:`gkpd.bench.speed`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gkpd.cli import CliError, _common_args, _data_args, _emit, _positive_int, resolve_model
from gkpd.cli_compress import _slack

log = logging.getLogger("gkpd")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _ratios(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers > 1, got {text!r}"
            ) from None
        if not value > 1:
            raise argparse.ArgumentTypeError(
                f"each ratio must be > 1 (dense parameters / compressed parameters), got {part}"
            )
        values.append(value)
    return values


def _choices(known: tuple[str, ...], *, none: bool = False):
    """``type=`` of a comma-separated subset of ``known`` (or ``none``, where allowed)."""

    def parse(text: str) -> list[str]:
        if none and text.strip() == "none":
            return []
        names = _names(text)
        unknown = [n for n in names if n not in known]
        if unknown or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names among {', '.join(known)}"
                + (" (or 'none')" if none else "") + f" without repeats, got {text!r}"
            )
        return names

    return parse


def _batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated distinct positive integers, got {text!r}"
        )
    return values


def _input_size(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (channels, *spatial), got {text!r}"
        )
    return values


def _some_ratios(text: str) -> list[float]:
    return [] if text == "none" else _ratios(text)


def _rounds(text: str) -> int:
    value = _positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3, got {text}")
    return value


def _slacks(text: str) -> list[float]:
    return [_slack(part) for part in text.split(",")]


def _latency_cache(text: str) -> str | None:
    if text == "none":
        return None
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a JSON file's path")
    return text


def _reference(text: str) -> dict[str, float]:
    reference = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            reference[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"expected METHOD=ACCURACY pairs separated by commas, got {text!r}"
            )
    return reference


def _cmd_accuracy(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from gkpd import data
    from gkpd.bench import AccuracyConfig, known_methods, run_accuracy
    from gkpd.bench.report import RESULTS_MD, require_matplotlib
    from gkpd.cli_compress import example_input
    from gkpd.train.finetune import finetune_loader

    unknown = [m for m in args.methods if m not in known_methods()]
    if unknown:
        raise CliError(
            f"--methods: unknown {', '.join(unknown)}; expected some of "
            f"{', '.join(known_methods())}"
        )
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
        seed=args.seed,
        latency_threads=args.latency_threads,
    )
    config.validate()
    if not args.no_plot:
        require_matplotlib()
    teacher, card = resolve_model(args.model)
    if card.get("compression"):
        raise CliError(f"MODEL {args.model} is already compressed; give the dense model")
    info = data.get_info(args.data)
    if card.get("dataset") not in (None, args.data):
        log.warning("model was trained on %s, benchmarking on %s", card["dataset"], args.data)
    norm = card.get("normalization")
    if norm and (tuple(norm["mean"]), tuple(norm["std"])) != (info.mean, info.std):
        log.warning("model was trained with normalization %s; %s uses %s", norm, args.data, info)
    train_loader = finetune_loader(
        args.data,
        args.data_dir,
        batch_size=args.batch_size,
        train_subset=args.train_subset,
        workers=args.workers,
    )
    test = data.build_dataset(args.data, "test", args.data_dir, augment=False)
    test_loader = DataLoader(test, batch_size=512, num_workers=args.workers)
    source = Path(args.model)
    results = run_accuracy(
        teacher,
        example_input(card),
        train_loader=train_loader,
        test_loader=test_loader,
        config=config,
        out=args.out,
        card=card,
        context={
            "model": str(source.resolve()) if source.exists() else args.model,
            "data": args.data,
        },
        reference=args.reference,
        reference_source=args.reference_source,
        plot=not args.no_plot,
        device=args.device,
        progress=not args.no_progress,
    )
    text = (Path(args.out) / RESULTS_MD).read_text(encoding="utf-8")
    failed = [c for c in results["cells"] if c.get("status") != "ok"]
    text += f"\nwritten to {args.out}" + (f" ({len(failed)} cell(s) failed)" if failed else "")
    _emit(args, results, text)
    return 0


def _add_accuracy(bench) -> None:
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
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="the trained dense model: a zoo name with shipped weights (e.g. "
        "resnet32_fashion_mnist), a directory written by gkpd train, or a checkpoint.pt",
    )
    _data_args(p)
    p.add_argument(
        "--methods",
        type=_names,
        required=True,
        help="comma-separated compression methods (gkpd.methods.method_names()) and/or "
        "'student', e.g. gkpd,svd,tucker,student",
    )
    p.add_argument(
        "--ratios", type=_ratios, required=True, help="comma-separated ratios > 1, e.g. 5,10"
    )
    p.add_argument("--epochs", type=_positive_int, required=True, help="fine-tuning epochs")
    p.add_argument(
        "--train-subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="N randomly drawn training samples per epoch, a fresh draw each epoch "
        "(default: all of them)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate")
    p.add_argument(
        "--student-lr",
        type=float,
        default=0.1,
        help="learning rate of the 'student', which starts from random weights",
    )
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the distillation term")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation temperature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--latency-threads",
        type=_positive_int,
        default=1,
        help="torch threads while timing batch-1 latency (default 1)",
    )
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--out", required=True, help="directory for the cells, table and plot")
    p.add_argument(
        "--reference",
        type=_reference,
        default=None,
        metavar="METHOD=ACC,...",
        help="published accuracies shown beside ours, e.g. dense=92.55,gkpd=91.52",
    )
    p.add_argument("--reference-source", default=None, help="where --reference comes from")
    p.add_argument("--no-plot", action="store_true", help="skip pareto.png (needs matplotlib)")
    _common_args(p)
    p.set_defaults(handler=_cmd_accuracy)


def _speed_model(args: argparse.Namespace):
    """MODEL -> (model, card): what ``resolve_model`` takes, or a ``gkpd.models`` architecture
    name, built with random weights (timing does not depend on them); ``--input-size``, if
    given, replaces the card's ``input_size``."""
    import torch

    from gkpd import models

    if Path(args.model).exists() or args.model in models.pretrained_names():
        model, card = resolve_model(args.model)
        if card.get("compression"):
            raise CliError(f"MODEL {args.model} is already compressed; give the dense model")
    elif args.model in models.list_models():
        if args.input_size is None:
            raise CliError(
                f"MODEL {args.model} is an architecture without shipped weights: give its "
                "input with --input-size, e.g. 3,224,224"
            )
        log.warning("%s: random weights (timings do not depend on them)", args.model)
        torch.manual_seed(0)
        model, card = models.create(args.model), {}
    else:
        raise CliError(
            f"MODEL {args.model!r} is neither an existing path, a model with shipped weights "
            f"({', '.join(models.pretrained_names())}) nor a gkpd.models architecture "
            f"({', '.join(models.list_models())})"
        )
    if args.input_size is not None:
        card = {**card, "input_size": args.input_size}
    return model.eval(), card


def _cmd_speed(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from gkpd.bench.speed import RESULTS_MD, SpeedConfig, run_speed
    from gkpd.cli_compress import example_input

    for name in ("graph_ratios", "peer_ratios"):
        values = getattr(args, name)
        missing = [r for r in values or () if r not in args.ratios]
        if missing:
            raise CliError(
                f"--{name.replace('_', '-')}: {', '.join(f'{r:g}' for r in missing)} not "
                f"among --ratios {','.join(f'{r:g}' for r in args.ratios)}"
            )
    needs = []
    if "onnxruntime" in args.backends:
        needs.append(("onnxruntime", "--backends onnxruntime", "onnx onnxruntime onnxscript"))
    if args.peers:
        needs.append(("tltorch", f"--peers {','.join(args.peers)}", "tensorly-torch"))
    for module, option, install in needs:
        if importlib.util.find_spec(module) is None:
            raise CliError(f"{option} needs {module}: pip install {install}, or leave it out")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a directory")
    model, card = _speed_model(args)
    config = SpeedConfig(
        ratios=tuple(args.ratios),
        batches=tuple(args.batches),
        objectives=tuple(args.objectives),
        backends=tuple(args.backends),
        graph_ratios=None if args.graph_ratios is None else tuple(args.graph_ratios),
        peers=tuple(args.peers),
        peer_ratios=None if args.peer_ratios is None else tuple(args.peer_ratios),
        rounds=args.rounds,
        threads=args.threads,
        memory=not args.no_memory,
        latency_cache=args.latency_cache,
        latency_slacks=tuple(args.latency_slacks),
        layouts=tuple(args.layouts),
        extra={"model": str(Path(args.model).resolve()) if Path(args.model).exists()
               else args.model},
    )
    try:
        config.validate()
    except ValueError as error:  # its message starts with the field's name
        field, _, rest = str(error).partition(" ")
        raise CliError(f"--{field.replace('_', '-')} {rest}") from None
    example = example_input(card)
    try:
        with torch.no_grad():
            model(example)
    except RuntimeError as error:
        raise CliError(
            f"MODEL {args.model} does not run on an input of shape {tuple(example.shape[1:])} "
            f"(--input-size, or the model card's input_size): {str(error).splitlines()[0]}"
        ) from None
    result = run_speed(model, example, config=config, out=out)
    text = (out / RESULTS_MD).read_text(encoding="utf-8") + f"\nwritten to {out}"
    _emit(args, result, text)
    return 0


def _add_speed(bench) -> None:
    from gkpd.bench.speed import BACKENDS, LAYOUTS, OBJECTIVES, PEERS

    p = bench.add_parser(
        "speed",
        help="CPU latency and peak memory of the dense model, GKPD and tensor factorizations",
        description="Time MODEL on this machine's CPU: dense; GKPD at each ratio, planned for "
        "the smallest error and, per batch size, for latency; and TensorLy-Torch's "
        "CP/Tucker/TT convolutions at the GKPD layers' sizes. Every variant of one batch and "
        "backend is timed in interleaved rounds; the table gives medians and speed-ups over "
        "dense, and each variant's peak memory in a fresh process. Writes speed.md and "
        "speed.json to --out.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="the dense model: a zoo name with shipped weights (e.g. resnet32_fashion_mnist), "
        "a directory written by gkpd train, a checkpoint.pt, or a gkpd.models architecture "
        "(e.g. resnet50, random weights; needs --input-size)",
    )
    p.add_argument(
        "--input-size",
        type=_input_size,
        default=None,
        metavar="C,H,W",
        help="input shape without the batch (default: the model card's input_size)",
    )
    p.add_argument("--ratios", type=_ratios, default=[2.0, 5.0, 10.0],
                   help="comma-separated ratios > 1 (default 2,5,10)")
    p.add_argument("--batches", type=_batches, default=[1, 64],
                   help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--objectives", type=_choices(OBJECTIVES), default=list(OBJECTIVES),
                   help="GKPD plans: 'error' (smallest error) and/or 'latency' (per batch, "
                   "times each layer's options here: slow for large models, cached; "
                   "default: both)")
    p.add_argument("--backends", type=_choices(BACKENDS), default=list(BACKENDS),
                   help=f"comma-separated, of {','.join(BACKENDS)} (default: all)")
    p.add_argument("--graph-ratios", type=_some_ratios, default=None,
                   help="ratios whose variants also run on compile/onnxruntime, or 'none' "
                   "(default: all of --ratios; the dense model always does)")
    p.add_argument("--peers", type=_choices(PEERS, none=True), default=list(PEERS),
                   help=f"TensorLy-Torch factorizations, of {','.join(PEERS)}, or 'none' "
                   "(default: all)")
    p.add_argument("--peer-ratios", type=_some_ratios, default=None,
                   help="ratios at which the peers are built, or 'none' "
                   "(default: all of --ratios)")
    p.add_argument("--rounds", type=_rounds, default=15,
                   help="timed rounds, at least 3; the median is reported (default 15)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch and onnxruntime threads while timing (default: torch's)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak memory measurement (one process per variant)")
    p.add_argument("--latency-cache", type=_latency_cache, default="default", metavar="PATH",
                   help="latency planner's timing cache: a JSON file, 'default' "
                   "($GKPD_CACHE_DIR or ~/.cache/gkpd/latency.json) or 'none'")
    p.add_argument("--latency-slacks", type=_slacks, default=[0.1],
                   help="comma-separated error slacks of the latency plans, one plan each "
                   "(default 0.1)")
    p.add_argument("--layouts", type=_choices(LAYOUTS), default=["contiguous"],
                   help="memory layouts the dense model and the latency plans run in, of "
                   f"{','.join(LAYOUTS)} (default: contiguous)")
    p.add_argument("--out", required=True, help="directory for speed.md and speed.json")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=_cmd_speed)


def add_parsers(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmarks that compare compression methods",
        description="Benchmarks that compare compression methods; see each one's --help.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    # one line per benchmark
    _add_accuracy(benchmarks)
    _add_speed(benchmarks)
