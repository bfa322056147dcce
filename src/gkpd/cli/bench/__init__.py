"""``gkpd bench``: benchmarks that compare compression methods.

``gkpd bench accuracy`` compresses one model with several methods at several ratios,
fine-tunes each the same way and writes a table and a Pareto plot (:mod:`gkpd.bench`).
``gkpd bench speed`` times the dense model, GKPD and TensorLy-Torch's factorizations on this
machine's CPU (:mod:`gkpd.bench.speed`). ``gkpd bench campaign`` summarizes accuracy campaigns
run at several learning rates.
"""

from __future__ import annotations


def add_parser(sub, **kwargs) -> None:
    from gkpd.cli.bench import accuracy, campaign, speed

    bench = sub.add_parser(
        "bench",
        help="benchmarks that compare compression methods",
        description="Benchmarks that compare compression methods; see each one's --help.",
        **kwargs,
    )
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    # one line per benchmark
    accuracy.add_parser(benchmarks, **kwargs)
    campaign.add_parser(benchmarks, **kwargs)
    speed.add_parser(benchmarks, **kwargs)
