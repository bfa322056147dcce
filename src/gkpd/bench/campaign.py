"""The accuracy campaign: the accuracy benchmark over several seeds, and its summary.

A campaign directory holds one accuracy-benchmark directory per seed (``seed0/``, ``seed1/``,
… each as :func:`gkpd.bench.run_accuracy` writes it, resumable per cell) and, written by
:func:`write_campaign`, ``results.json`` (one row per method × ratio × seed), ``results.md``
(mean ± sd over seeds) and ``accuracy.png`` (accuracy against parameters).

Methods fine-tune best at different learning rates (CP's factors barely move at the lr that
suits GKPD and Tucker-2), so a campaign may span several directories of seeds, one per
learning rate, equal in every other setting. The summary then gives each method at the
learning rate where its mean is highest (its own best setting), and every learning rate
measured below that.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gkpd.bench.accuracy import BENCH_FILE, DENSE, RESULT_FILE, STUDENT
from gkpd.bench.report import distillation_text, require_matplotlib
from gkpd.bench.variants import VARIANTS
from gkpd.files import atomic_write, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "accuracy.png"
# budget keys that may differ between the directories of one campaign (one lr per directory)
_PER_DIRECTORY = ("lr", "student_lr")
_BUDGET_KEYS = ("seed", "epochs", "train_subset")
_ROW_KEYS = ("method", "ratio", "achieved_ratio", "params", "macs", "accuracy_before",
             "accuracy_after", "finetune_seconds")


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


def _read(path: Path, needs: Sequence[str] = ()) -> dict[str, Any]:
    """The JSON object in ``path``, holding a value (not null) for each of ``needs``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable or not JSON ({error}); delete it") from error
    return _require(value, path, needs)


def _require(value: Any, path: Path, needs: Sequence[str]) -> dict[str, Any]:
    """``value`` (read from ``path``) if it is a JSON object with a value for each of
    ``needs``."""
    missing = [k for k in needs if not isinstance(value, dict) or value.get(k) is None]
    if not isinstance(value, dict) or missing:
        what = "not a JSON object" if not isinstance(value, dict) else (
            f"missing {', '.join(missing)}")
        raise ValueError(f"{path} is not a gkpd bench file ({what}); delete it")
    return value


def _differing_keys(budget: dict, reference: dict, ignored: Sequence[str]) -> list[str]:
    """The budget keys, other than ``ignored``, whose values differ between the two budgets."""
    return sorted(k for k in {*reference, *budget} - set(ignored)
                  if budget.get(k) != reference.get(k))


def collect_rows(out: str | Path, *, train_size: int | None = None) -> dict[str, Any]:
    """Every finished cell under ``out`` as a row; ``train_size``: the training split's
    length, for cells fine-tuned on all of it (their per-epoch sample count)."""
    out = Path(out)
    rows, failed, dense, budgets = [], [], None, {}
    for directory in sorted(out.glob("seed*")):
        if not (directory / BENCH_FILE).is_file():
            continue
        budget = _read(directory / BENCH_FILE, ("budget",))["budget"]
        if not isinstance(budget, dict) or any(k not in budget for k in _BUDGET_KEYS):
            raise ValueError(f"{directory / BENCH_FILE} is not a gkpd bench file (its budget "
                             f"lacks {', '.join(_BUDGET_KEYS)}); delete it")
        budgets[directory.name] = budget
        if (directory / f"{DENSE}.json").is_file():
            dense = _read(directory / f"{DENSE}.json")
        for path in sorted(directory.glob(f"*/{RESULT_FILE}")):
            cell = _read(path, ("status",))
            if cell["status"] != "ok":
                failed.append({"dir": f"{directory.name}/{path.parent.name}",
                               "error": cell.get("error")})
                continue
            _require(cell, path, ("method", "ratio", "accuracy_after"))
            row = {key: cell.get(key) for key in _ROW_KEYS}
            row["seed"] = budget["seed"]
            row["epochs"] = cell.get("epochs", budget["epochs"])
            row["train_samples"] = cell.get("train_samples") or budget["train_subset"] or (
                train_size
            )
            settings = {k: budget[k] for k in ("lr", "batch_size", "weight_decay", "alpha",
                                                "temperature", "feature_layers",
                                                "feature_weight") if k in budget}
            if row["method"] == STUDENT and "student_lr" in budget:
                settings["lr"] = budget["student_lr"]  # trained from scratch at its own lr
            settings["strategy"] = cell.get("strategy", "uniform")
            if row["method"] in VARIANTS:
                base, options = VARIANTS[row["method"]]
                if options:
                    settings["variant_of"] = base
                    settings["options"] = {k: str(v) for k, v in options.items()}
                else:  # a variant pinning nothing made the method's own call: its row
                    settings["run_as"] = row["method"]
                    row["method"] = base
            if cell.get("plan_options"):
                settings["plan_options"] = cell["plan_options"]
            row["settings"] = settings
            row["cell"] = f"{directory.name}/{path.parent.name}"
            rows.append(row)
    shared = {k: v for k, v in next(iter(budgets.values()), {}).items() if k != "seed"}
    for name, budget in budgets.items():
        differs = _differing_keys(budget, shared, ignored=("seed",))
        if differs:
            raise ValueError(f"{out / name} has another budget ({', '.join(differs)}) than the "
                             "other seeds: a campaign compares one budget")
    rows.sort(key=lambda r: (r["ratio"], r["method"], r["seed"]))
    return {"budget": shared, "dense": dense, "rows": rows, "failed": failed}


def collect_campaign(cells: str | Path | Sequence[str | Path], *,
                     train_size: int | None = None) -> dict[str, Any]:
    """:func:`collect_rows` of one directory of seeds, or of several (one per learning rate)
    whose budgets differ in nothing but the learning rate; a (method, ratio, seed, lr) cell
    found twice is refused."""
    directories = [Path(cells)] if isinstance(cells, (str, Path)) else [Path(c) for c in cells]
    if not directories:
        raise ValueError("cells: expected at least one campaign directory, got none")
    parts = [collect_rows(d, train_size=train_size) for d in directories]
    for directory, part in zip(directories, parts, strict=True):
        if not part["budget"]:
            raise ValueError(f"cells: {directory} holds no seed directory of the accuracy "
                             f"benchmark (seed*/{BENCH_FILE})")
    first = parts[0]["budget"]
    for directory, part in zip(directories[1:], parts[1:], strict=True):
        differs = _differing_keys(part["budget"], first, ignored=_PER_DIRECTORY)
        if differs:
            raise ValueError(f"cells: {directory} has another budget ({', '.join(differs)}) "
                             f"than {directories[0]}; directories of one campaign may differ "
                             "only in the learning rate")
    rows, seen = [], {}
    for directory, part in zip(directories, parts, strict=True):
        for row in part["rows"]:
            if len(directories) > 1:
                row["cell"] = f"{directory.name}/{row['cell']}"
            key = (row["method"], row["ratio"], row["seed"], row["settings"].get("lr"))
            if key in seen:
                raise ValueError(f"cells: {row['cell']} and {seen[key]} are the same cell "
                                 f"({row['method']} {row['ratio']:g}x, seed {row['seed']}, "
                                 f"lr {key[3]})")
            seen[key] = row["cell"]
            rows.append(row)
    rows.sort(key=lambda r: (r["ratio"], r["method"], r["seed"], r["settings"].get("lr") or 0))
    budget = {k: v for k, v in first.items() if k not in _PER_DIRECTORY}
    for key in _PER_DIRECTORY:
        values = sorted({p["budget"][key] for p in parts if key in p["budget"]})
        if values:
            budget[key] = values[0] if len(values) == 1 else values
    dense = next((p["dense"] for p in parts if p["dense"]), None)
    return {"budget": budget, "dense": dense, "rows": rows,
            "failed": [f for p in parts for f in p["failed"]]}


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample sd of accuracy over seeds, per (ratio, method, lr), best first."""
    groups: dict[tuple[float, str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        lr = row.get("settings", {}).get("lr")
        groups.setdefault((row["ratio"], row["method"], lr), []).append(row)
    summary = []
    for (ratio, method, lr), group in groups.items():
        after = [r["accuracy_after"] for r in group]
        before = [r["accuracy_before"] for r in group]
        summary.append({
            "ratio": ratio, "method": method, "lr": lr,
            "seeds": sorted(r["seed"] for r in group),
            "params": statistics.mean(r["params"] for r in group),
            "achieved_ratio": statistics.mean(r["achieved_ratio"] for r in group),
            "accuracy_after": statistics.mean(after),
            "accuracy_after_sd": statistics.stdev(after) if len(after) > 1 else None,
            "accuracy_before": statistics.mean(before),
        })
    summary.sort(key=lambda s: (s["ratio"], -s["accuracy_after"]))
    return summary


def best_learning_rates(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (ratio, method), the summary row of the learning rate with the highest mean (on
    ties, the one with more seeds), best first."""
    best: dict[tuple[float, str], dict[str, Any]] = {}
    for s in summary:
        key = (s["ratio"], s["method"])
        rank = (s["accuracy_after"], len(s["seeds"]))
        if key not in best or rank > (best[key]["accuracy_after"], len(best[key]["seeds"])):
            best[key] = s
    return sorted(best.values(), key=lambda s: (s["ratio"], -s["accuracy_after"]))


def _table(summary: Sequence[dict[str, Any]], dense: dict[str, Any], with_lr: bool) -> list[str]:
    lr_head, lr_rule = ("lr | ", "---|") if with_lr else ("", "")
    lines = [f"| ratio | method | {lr_head}seeds | achieved | params | acc. before | acc. after "
             "(mean ± sd) | vs dense |", f"|---|---|{lr_rule}---|---|---|---|---|---|"]
    for s in summary:
        sd = "" if s["accuracy_after_sd"] is None else f" ± {s['accuracy_after_sd']:.2f}"
        vs = (f"{s['accuracy_after'] - dense['accuracy_after']:+.2f}"
              if "accuracy_after" in dense else "–")
        lr = f"{s['lr']:g} | " if with_lr else ""
        lines.append(
            f"| {s['ratio']:g}x | {s['method']} | {lr}{len(s['seeds'])} | "
            f"{s['achieved_ratio']:.2f}x | {s['params'] / 1e3:.2f}k | "
            f"{s['accuracy_before']:.2f} | {s['accuracy_after']:.2f}{sd} | {vs} |"
        )
    return lines


def format_campaign(results: dict[str, Any]) -> str:
    dense = results.get("dense") or {}
    budget = results["budget"]
    summary = results["summary"]
    # directories at several lrs (collect_campaign lists them); one directory's student has
    # its own lr beside the others' and keeps the plain table
    several = any(isinstance(budget.get(key), list) for key in _PER_DIRECTORY)
    if several:
        lines = ["Each method at its best learning rate (highest mean over its seeds):", "",
                 *_table(results["best"], dense, True), "", "Every learning rate measured:",
                 "", *_table(summary, dense, True)]
    else:
        lines = _table(summary, dense, False)
    samples = {r["train_samples"] for r in results["rows"]} or {budget.get("train_subset")}
    lr = budget.get("lr")
    lr_text = (f"lr {lr}" if not isinstance(lr, list)
               else f"lr {' or '.join(str(v) for v in lr)} as the table says")
    notes = [
        "",
        f"Dense teacher: {dense.get('accuracy_after', float('nan')):.2f}% "
        f"({dense.get('params', 0) / 1e3:.2f}k parameters). Every cell: {budget.get('epochs')} "
        f"epochs of {', '.join(str(s) for s in sorted(samples, key=str))} training samples, "
        f"batch {budget.get('batch_size')}, {lr_text}, cosine, "
        f"{distillation_text(budget)}; the student from random weights with lr "
        f"{budget.get('student_lr')}. Test accuracy in %.",
    ]
    if several:
        notes.append("The best learning rate of each method is chosen on the test accuracy "
                     "it reports, alike for every method.")
    notes += variant_notes(s["method"] for s in summary)
    aliases = sorted({(r["settings"]["run_as"], r["method"]) for r in results["rows"]
                      if "run_as" in r.get("settings", {})})
    notes += [f"- {method}: includes the cells run as {alias}, a variant that pins nothing "
              f"(the same call, method={method!r} with its default arguments)."
              for alias, method in aliases]
    for f in results["failed"]:
        notes.append(f"- {f['dir']} failed: {f['error']}")
    return "\n".join(lines + notes) + "\n"


def variant_notes(methods) -> list[str]:
    """One line per variant among ``methods`` (in the order of first appearance): the method
    it runs and the options it pins — so that a reader sees that a variant pinning nothing is
    what ``gkpd.compress(..., method=…)`` gives with its default arguments."""
    lines = []
    for name in dict.fromkeys(methods):
        if name not in VARIANTS:
            continue
        base, options = VARIANTS[name]
        pinned = (", ".join(f"{k}={v!r}" for k, v in options.items()) if options
                  else f"nothing: method={base!r} with its default arguments")
        lines.append(f"- {name}: method {base!r}, pinning {pinned}.")
    return [""] + lines if lines else []


def plot_campaign(path: Path, results: dict[str, Any]) -> Path:
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    try:
        dense = results.get("dense")
        if dense:
            ax.axhline(dense["accuracy_after"], color="0.4", linestyle="--", linewidth=1,
                       label=f"dense ({dense['accuracy_after']:.2f}%)")
        best = results["best"]
        methods = list(dict.fromkeys(s["method"] for s in best))
        for i, method in enumerate(sorted(methods)):
            points = sorted((s["params"], s["accuracy_after"], s["accuracy_after_sd"] or 0.0)
                            for s in best if s["method"] == method)
            ax.errorbar([p[0] for p in points], [p[1] for p in points],
                        yerr=[p[2] for p in points], marker="osD^vP*Xh<>p"[i % 12],
                        color=f"C{i}", linestyle=":", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (log scale)")
        ax.set_ylabel("test accuracy after fine-tuning (%, mean ± sd over seeds)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)
    return path


def write_campaign(out: str | Path, *,
                   cells: str | Path | Sequence[str | Path] | None = None,
                   train_size: int | None = None, plot: bool = True) -> dict[str, Any]:
    """Collect every seed's finished cells under ``cells`` (default ``out``; several
    directories, one per learning rate, as :func:`collect_campaign` takes them) and write the
    campaign's ``results.json``, ``results.md`` and (with ``plot``) ``accuracy.png`` to
    ``out``."""
    out = Path(out)
    results = collect_campaign(out if cells is None else cells, train_size=train_size)
    results["summary"] = summarize(results["rows"])
    results["best"] = best_learning_rates(results["summary"])
    for row in results["rows"]:
        for key in ("accuracy_before", "accuracy_after"):
            if row[key] is not None and not math.isfinite(row[key]):
                raise ValueError(f"{row['cell']}: {key} is not finite")
    atomic_write_text(out / RESULTS_JSON,
                      json.dumps(results, indent=2, sort_keys=True, allow_nan=False) + "\n")
    atomic_write_text(out / RESULTS_MD, format_campaign(results))
    if plot and results["summary"]:
        plot_campaign(out / PLOT_PNG, results)
    return results
