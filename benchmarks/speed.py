"""CPU latency and peak memory of dense, GKPD and TensorLy-Torch variants (`gkpd bench speed`).

usage:
  python benchmarks/speed.py                    # the shipped ResNet-32 on Fashion-MNIST
  python benchmarks/speed.py resnet50 --input-size 3,224,224 --ratios 2 --batches 8
                                # the ResNet-50 table in RESULTS.md (its latency plans take
                                # a few minutes each the first time, then come from the cache)
  add --dry-run to print the gkpd command instead of running it

Default run (the recorded one): resnet32_fashion_mnist at 2x, 5x and 10x, batches 1 and 64;
GKPD planned for the smallest error and, per batch, for latency; eager for every variant,
torch.compile and onnxruntime for dense and the 5x variants; TensorLy-Torch CP, Tucker and TT
at 5x; two torch threads (this machine's cores). The latency plans accept 1.3x the smallest
error per layer and are timed in NCHW and channels_last and run in the faster, called with
NCHW inputs (beside the dense model in both layouts). Writes speed.md and speed.json to
benchmarks/speed_fashion_mnist/.

Any other MODEL (a gkpd.models architecture such as resnet50, which has torchvision's
ResNet-50 layout, with random weights; or a trained model directory) needs --input-size unless
its card has one; its results go to benchmarks/speed_MODEL/ unless --out says otherwise, and
without --graph-ratios / --peer-ratios every ratio is compiled, exported and given peers.
The timings are this machine's, measured in one run: compare the ratios within a table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FASHION_MNIST = {
    "model": "resnet32_fashion_mnist",
    "out": HERE / "speed_fashion_mnist",
    "ratios": "2,5,10",
    "graph_ratios": "5",
    "peer_ratios": "5",
    "batches": "1,64",
    "threads": "2",
    "latency_slacks": "0.3",
    "layouts": "contiguous,channels_last",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("model", nargs="?", default=FASHION_MNIST["model"], metavar="MODEL",
                        help=f"model to time (default {FASHION_MNIST['model']})")
    parser.add_argument("--input-size", default=None, metavar="C,H,W",
                        help="input shape without the batch (e.g. 3,224,224)")
    parser.add_argument("--ratios", default=None, help="comma-separated ratios (default 2,5,10)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes "
                        "(default 1,64)")
    parser.add_argument("--objectives", default=None,
                        help="GKPD plans: error,latency (default: both; the latency plans "
                        "time every layer the first time)")
    parser.add_argument("--backends", default=None,
                        help="of eager,compile,onnxruntime (default: all)")
    parser.add_argument("--graph-ratios", default=None,
                        help="ratios also compiled and exported (default run: 5)")
    parser.add_argument("--peers", default=None, help="of cp,tucker,tt, or none (default: all)")
    parser.add_argument("--peer-ratios", default=None,
                        help="ratios with TensorLy-Torch peers (default run: 5)")
    parser.add_argument("--rounds", default=None, help="timed rounds (default 15)")
    parser.add_argument("--threads", default=FASHION_MNIST["threads"],
                        help="torch threads (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--latency-cache", default=None,
                        help="latency planner's cache file, or none")
    parser.add_argument("--latency-slacks", default=None,
                        help="error slacks of the latency plans (default 0.1)")
    parser.add_argument("--layouts", default=None,
                        help="of contiguous,channels_last (default: both)")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    return parser.parse_args(argv)


def command(args: argparse.Namespace) -> list[str]:
    """The `gkpd` command line (without the leading `gkpd`)."""
    default_run = args.model == FASHION_MNIST["model"] and args.ratios is None
    name = "fashion_mnist" if args.model == FASHION_MNIST["model"] else Path(args.model).name
    out = args.out or str(HERE / f"speed_{name}")
    line = ["-v", "bench", "speed", args.model, "--out", out,
            "--ratios", args.ratios or FASHION_MNIST["ratios"],
            "--batches", args.batches or FASHION_MNIST["batches"],
            "--threads", args.threads]
    graph_ratios = args.graph_ratios or (FASHION_MNIST["graph_ratios"] if default_run else None)
    peer_ratios = args.peer_ratios or (FASHION_MNIST["peer_ratios"] if default_run else None)
    for option, value in (
        ("--input-size", args.input_size), ("--objectives", args.objectives),
        ("--backends", args.backends),
        ("--graph-ratios", graph_ratios), ("--peers", args.peers),
        ("--peer-ratios", peer_ratios), ("--rounds", args.rounds),
        ("--latency-cache", args.latency_cache),
        ("--latency-slacks", args.latency_slacks
         or (FASHION_MNIST["latency_slacks"] if default_run else None)),
        ("--layouts", args.layouts or (FASHION_MNIST["layouts"] if default_run else None)),
    ):
        if value is not None:
            line += [option, value]
    return line + (["--no-memory"] if args.no_memory else [])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    step = command(args)
    print("gkpd " + " ".join(shlex.quote(a) for a in step), flush=True)
    if args.dry_run:
        return 0
    from gkpd.cli import main as gkpd_main

    return gkpd_main(step)


if __name__ == "__main__":
    sys.exit(main())
