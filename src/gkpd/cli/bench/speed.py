"""``gkpd bench speed``: CPU latency and peak memory of the dense model, GKPD and
TensorLy-Torch's factorizations on this machine (:mod:`gkpd.bench.speed`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gkpd.cli.bench import types
from gkpd.cli.common import CliError, command_line, emit, log, positive_int, writable_dir


def _model(args: argparse.Namespace):
    """MODEL -> (model, card): what ``resolve_model`` takes, or a ``gkpd.models`` architecture
    name, built with random weights (timing does not depend on them); ``--input-size``, if
    given, replaces the card's ``input_size``."""
    import torch

    from gkpd import models
    from gkpd.resolve import resolve_model

    if Path(args.model).exists() or args.model in models.pretrained_names():
        model, card = resolve_model(args.model)
        if card.get("compression"):
            raise CliError(f"MODEL {args.model} is already compressed; give the dense model")
    elif _architecture(args.model):
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


def _architecture(name: str) -> bool:
    """Whether ``name`` names a ``gkpd.models`` architecture (or an alias of one)."""
    from gkpd import models

    try:
        models.canonical_name(name)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    import importlib.util

    import torch

    from gkpd.bench.speed import RESULTS_MD, SpeedConfig, run_speed
    from gkpd.models.cards import example_input

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
    model, card = _model(args)
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
               else args.model, "command": command_line()},
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
    writable_dir(out)  # before the minutes of timing, not after them
    result = run_speed(model, example, config=config, out=out)
    text = (out / RESULTS_MD).read_text(encoding="utf-8") + f"\nwritten to {out}"
    emit(args, result, text)
    return 0


def add_parser(bench, **kwargs) -> None:
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
        **kwargs,
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
        type=types.input_size,
        default=None,
        metavar="C,H,W",
        help="input shape without the batch (default: the model card's input_size)",
    )
    p.add_argument("--ratios", type=types.ratios, default=[2.0, 5.0, 10.0],
                   help="comma-separated ratios > 1 (default 2,5,10)")
    p.add_argument("--batches", type=types.batches, default=[1, 64],
                   help="comma-separated batch sizes (default 1,64)")
    p.add_argument("--objectives", type=types.choices(OBJECTIVES), default=list(OBJECTIVES),
                   help="GKPD plans: 'error' (smallest error) and/or 'latency' (per batch, "
                   "times each layer's options here: slow for large models, cached; "
                   "default: both)")
    p.add_argument("--backends", type=types.choices(BACKENDS), default=list(BACKENDS),
                   help=f"comma-separated, of {','.join(BACKENDS)} (default: all)")
    p.add_argument("--graph-ratios", type=types.some_ratios, default=None,
                   help="ratios whose variants also run on compile/onnxruntime, or 'none' "
                   "(default: all of --ratios; the dense model always does)")
    p.add_argument("--peers", type=types.choices(PEERS, none=True), default=list(PEERS),
                   help=f"TensorLy-Torch factorizations, of {','.join(PEERS)}, or 'none' "
                   "(default: all)")
    p.add_argument("--peer-ratios", type=types.some_ratios, default=None,
                   help="ratios at which the peers are built, or 'none' "
                   "(default: all of --ratios)")
    p.add_argument("--rounds", type=types.rounds, default=15,
                   help="timed rounds, at least 3; the median is reported (default 15)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch and onnxruntime threads while timing (default: torch's)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the peak memory measurement (one process per variant)")
    p.add_argument("--latency-cache", type=types.latency_cache, default="default", metavar="PATH",
                   help="latency planner's timing cache: a JSON file, 'default' "
                   "($GKPD_CACHE_DIR or ~/.cache/gkpd/latency.json) or 'none'")
    p.add_argument("--latency-slacks", type=types.slacks, default=[0.1],
                   help="comma-separated error slacks of the latency plans, one plan each "
                   "(default 0.1)")
    p.add_argument("--layouts", type=types.choices(LAYOUTS), default=list(LAYOUTS),
                   help="memory layouts the dense model runs in and the latency plans are "
                   f"timed in (each runs in its faster), of {','.join(LAYOUTS)} (default: both)")
    p.add_argument("--out", required=True, help="directory for speed.md and speed.json")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=run)
