"""The accuracy benchmark's outputs: a markdown table, ``results.json`` and a Pareto plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gkpd.files import atomic_write, atomic_write_text

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
PARETO_PNG = "pareto.png"


def distillation_text(budget: dict[str, Any]) -> str:
    """How every compressed cell was distilled, from a bench budget (``config``), for the
    notes under a table."""
    text = f"distilled from the dense model (alpha {budget['alpha']:g}, T {budget['temperature']:g}"
    if budget.get("feature_layers"):
        text += (f"; and the outputs of {', '.join(budget['feature_layers'])} by mean squared "
                 f"error, weight {budget['feature_weight']:g}, the student's excepted")
    return text + ")"


def require_matplotlib():
    """``matplotlib.pyplot`` with a non-interactive backend, or an ImportError saying how to
    install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "the Pareto plot needs matplotlib: pip install 'gkpd[plot]' (or turn the plot off)"
        ) from error
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _title(results: dict[str, Any]) -> str:
    context = results.get("context") or {}
    return f"{Path(str(context.get('model', '?'))).name} on {context.get('data', '?')}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown table: the dense model first, then one row per (method, ratio) cell."""
    reference = results.get("reference") or {}
    dense = results["dense"]
    header = [
        "method", "target", "achieved", "params", "MACs", "acc. before", "acc. after",
        "vs dense", "latency b=1 (ms)", "fine-tune (s)",
    ]
    if reference:
        header.insert(8, "paper")
    rows, failures = [], []
    for row in [dense, *results["cells"]]:
        ok = row.get("status") == "ok"
        after = row.get("accuracy_after") if ok else None
        cells = [
            row["method"],
            "–" if row["method"] == "dense" else f"{row['ratio']:g}x",
            _num(row.get("achieved_ratio"), ".2f") + ("x" if "achieved_ratio" in row else ""),
            _count(row.get("params")),
            _count(row.get("macs")),
            _num(row.get("accuracy_before"), ".2f"),
            _num(after, ".2f"),
            "–" if after is None or row is dense else f"{after - dense['accuracy_after']:+.2f}",
            _num(row.get("latency_ms") if ok else None, ".2f"),
            _seconds(row.get("finetune_seconds") if ok else None),
        ]
        if reference:
            cells.insert(8, _num(reference.get(row["method"]), ".2f"))
        if not ok:
            cells[6] = "failed"
            failures.append(f"{row['method']} at {row['ratio']:g}x failed at stage "
                            f"{row.get('stage', '?')}: {row.get('error', '?')}")
        strategy = row.get("strategy", "uniform")
        if strategy != "uniform":
            cells[0] += f" ({strategy})"
            failures.append(f"{row['method']} at {row['ratio']:g}x: strategy '{strategy}' "
                            f"(uniform: {row.get('uniform_error', '?')})")
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    config = results["config"]
    epochs = config["epochs"]
    notes = [
        f"{_title(results)}; test accuracy in %. "
        f"Every cell fine-tuned {epochs} epoch{'s' * (epochs != 1)} of "
        f"{config['train_subset'] or 'all'} training samples (batch {config['batch_size']}, "
        f"lr {config['lr']:g}, cosine; the student from random weights with lr "
        f"{config['student_lr']:g}), {distillation_text(config)}, seed {config['seed']}.",
        f"Latency: median of {config['latency_repeats']} forward passes at batch 1 on "
        f"{results.get('device', '?')}, {config['latency_threads'] or 'all'} thread(s). "
        "Fine-tune time: training epochs only.",
    ]
    if reference:
        notes.append(f"paper: {results.get('reference_source') or 'published accuracy'}.")
    notes += ([""] if failures else []) + [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def pareto_plot(path: str | Path, results: dict[str, Any]) -> Path:
    """Two panels, accuracy after fine-tuning vs parameters and vs MACs; one marker and colour
    per method; the dense model as a dashed reference line. Written atomically as PNG."""
    plt = require_matplotlib()
    dense = results["dense"]
    cells = [c for c in results["cells"] if c.get("status") == "ok"]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    markers = "osD^vP*Xh<>p"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    try:
        for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "macs", "MACs")):
            ax.axhline(dense["accuracy_after"], color="0.4", linestyle="--", linewidth=1,
                       label=f"dense ({dense['accuracy_after']:.2f}%)")
            ax.plot([dense[key]], [dense["accuracy_after"]], marker="*", color="0.2",
                    markersize=11, linestyle="none")
            for i, method in enumerate(methods):
                points = sorted((c[key], c["accuracy_after"]) for c in cells
                                if c["method"] == method)
                ax.plot([p[0] for p in points], [p[1] for p in points],
                        marker=markers[i % len(markers)], color=f"C{i}", linestyle=":",
                        label=method)
            ax.set_xscale("log")
            ax.set_xlabel(f"{label} (log scale)")
            ax.set_ylabel("test accuracy after fine-tuning (%)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"{_title(results)}: {results['config']['epochs']} fine-tuning epoch(s) "
                     "per model")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return Path(path)


def write_reports(out: str | Path, results: dict[str, Any], *, plot: bool = True) -> None:
    """``results.json`` and ``results.md`` (and ``pareto.png``) in ``out``, each atomically."""
    out = Path(out)
    atomic_write_text(
        out / RESULTS_JSON, json.dumps(results, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    atomic_write_text(out / RESULTS_MD, format_table(results))
    if plot:
        pareto_plot(out / PARETO_PNG, results)
