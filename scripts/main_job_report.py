"""The main job's report: ``report.md`` and the per-layer plot ``layers.png``, from what
``scripts/main_job.py`` measured (its ``report.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gkpd.files import atomic_write_text
from gkpd.models.cards import WEIGHTS_FILE
from gkpd.plan.schema import CompressionPlan


def plot_layers(plan: CompressionPlan, path: Path) -> bool:
    """Per layer, the compression and the relative error, to `path`; False (no plot) without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = plan.layers
    names = [e.name for e in layers]
    ratios = [e.dense_params / e.params if e.params else 1.0 for e in layers]
    errors = [e.relative_error if e.compressed else 0.0 for e in layers]
    colors = ["tab:blue" if e.compressed else "tab:gray" for e in layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    top.bar(range(len(names)), ratios, color=colors)
    top.axhline(
        plan.achieved_ratio,
        color="tab:red",
        linestyle="--",
        label=f"whole model {plan.achieved_ratio:.2f}x",
    )
    top.set_ylabel("parameter compression (x)")
    top.set_title(
        f"{plan.model_type}, {plan.method} {plan.strategy}, target "
        f"{plan.target_ratio:g}x (gray: kept dense)"
    )
    top.legend()
    bottom.bar(range(len(names)), errors, color=colors)
    bottom.set_ylabel("relative error ‖W−Ŵ‖/‖W‖")
    bottom.set_xticks(range(len(names)))
    bottom.set_xticklabels(names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: Path, report: dict[str, Any], plan: CompressionPlan) -> None:
    acc, size, lat = report["accuracy"], report["size"], report["latency"]
    ft = report["finetune"]
    lines = [
        f"# gkpd main job: ResNet-32 on Fashion-MNIST, compressed {plan.target_ratio:g}x with GKPD",
        "",
        f"Teacher `{report['teacher']}`; {plan.method}, {plan.strategy} strategy, planned "
        f"for {_objective(plan)}; fine-tuned "
        f"with distillation (alpha 0.9, T 4) for {ft['epochs']} epochs of "
        f"{_images(ft['images_per_epoch'])} randomly drawn training images each (of "
        f"{ft['train_images']:,}), lr {ft['lr']}, batch {ft['batch_size']}.",
        "",
        "| | dense | compressed, before fine-tuning | compressed, fine-tuned |",
        "|---|---:|---:|---:|",
        f"| test accuracy (%) | {acc['dense']:.2f} | {acc['before_finetune']:.2f} | "
        f"{acc['after_finetune']:.2f} |",
        f"| parameters | {size['dense_params']:,} | {size['params']:,} | {size['params']:,} |",
        f"| MACs per image | {size['dense_macs']:,} | {size['macs']:,} | {size['macs']:,} |",
        f"| weights file (bytes) | {size['dense_bytes']:,} | {size['bytes']:,} | "
        f"{size['bytes']:,} |",
        "",
        f"Parameters {size['param_ratio']:.2f}x fewer, MACs {size['mac_ratio']:.2f}x fewer, "
        f"weights file {size['bytes_ratio']:.2f}x smaller (`{WEIGHTS_FILE}`); "
        f"{size['compressed_layers']} of {size['layers']} conv/linear layers compressed"
        + (
            "; kept dense: "
            + "; ".join(f"`{e.name}` ({e.reason})" for e in plan.layers if not e.compressed)
            if size["compressed_layers"] < size["layers"]
            else ""
        )
        + ".",
        f"Accuracy gap to the teacher after fine-tuning: {acc['gap']:+.2f} points.",
        "",
        f"## CPU latency (median, {lat['threads']} thread{'s' if lat['threads'] > 1 else ''}, "
        f"{report['machine']['cpu']})",
        "",
        "| batch | dense (ms) | dense layout | compressed (ms) | speed-up |",
        "|---:|---:|---|---:|---:|",
    ]
    for batch in (1, 64):
        e = lat[f"batch_{batch}"]
        lines.append(
            f"| {batch} | {e['dense']:.2f} | {e.get('dense_layout', 'contiguous')} | "
            f"{e['compressed']:.2f} | {e['speedup']:.2f}x |"
        )
    lines += [
        "",
        "Latency was measured in one run, the models alternating; the dense model is timed "
        "in both memory layouts and counted in the faster, the compressed one is called "
        "with plain NCHW inputs. On a shared machine the numbers are noisy.",
        "",
        *_machine_note(report["machine"]),
        "## Per layer",
        "",
        "![per-layer compression and error](layers.png)" if report["plot"] else "(no plot)",
        "",
        "```",
        plan.table(),
        "```",
        "",
        "## Fine-tuning",
        "",
        "| epoch | images | train loss | train acc (%) | test acc (%) | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for h, images in zip(ft["history"], ft["images_per_epoch"], strict=True):
        lines.append(
            f"| {h['epoch']} | {images:,} | {h['train_loss']:.4f} | {h['train_accuracy']:.2f} "
            f"| {h['eval_accuracy']:.2f} | {h['seconds']:.0f} |"
        )
    lines += ["", *_budget_note(ft)]
    lines += [
        f"Whole job: {report['wall_minutes']:.1f} minutes (set-up included: "
        f"{report['setup_included']}).",
        "",
        "## A longer, better run",
        "",
        "This short budget stops well before the fine-tuned model converges. The full run "
        "(all 60,000 images per epoch; the paper's recipe uses many more epochs):",
        "",
        "```",
        report["longer_run"],
        "```",
        "",
        "or the same through the main job:",
        "",
        "```",
        report["longer_run_main_job"],
        "```",
        "",
        f"Commands of this run: `{report['commands']['compress']}`, then "
        f"`{report['commands']['finetune']}`.",
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _machine_note(machine: dict[str, Any]) -> list[str]:
    """Whether other processes kept the cores busy while the job planned, trained and timed
    (``/proc/stat``, less the job's own CPU time)."""
    others = machine.get("other_processes_cores") or {}
    known = {step: cores for step, cores in others.items() if cores is not None}
    if not known:
        return ["Whether other processes ran meanwhile is unknown (no /proc/stat).", ""]
    figures = ", ".join(f"{step.replace('_', ' ')} {cores:.2f}" for step, cores in known.items())
    if machine["busy_steps"]:
        verdict = (f"**The machine was busy** (at least {machine['busy_cores']:g} of a core "
                   "taken by others): this run's times, the plan's latency choices included, "
                   "are slower and noisier than a quiet machine's.")
    else:
        verdict = "The machine was quiet."
    threads = machine.get("threads") or {}
    if threads.get("used", 0) < threads.get("started", 0):
        verdict += (f" The job ran on {threads['used']} of {threads['started']} threads, not "
                    "all, after the dense evaluation, to leave the busy cores alone.")
    return [f"Cores other processes kept busy on average — {figures}. {verdict}", ""]


def _objective(plan: CompressionPlan) -> str:
    if plan.objective == "latency":
        return f"latency on this machine (it runs in the {plan.layout} layout)"
    return "the least error"


def _images(per_epoch: list[int]) -> str:
    """``20,480`` when every epoch drew as many images, else ``20,480, 10,240, 10,240``."""
    return ", ".join(f"{n:,}" for n in (per_epoch[:1] if len(set(per_epoch)) == 1 else per_epoch))


def _budget_note(ft: dict[str, Any]) -> list[str]:
    """A paragraph when the budget check changed the images an epoch drew."""
    if ft["budget_minutes"] is None or len(set(ft["images_per_epoch"])) == 1:
        return []
    return [
        f"The budget, re-checked during and after every epoch, changed the images per epoch "
        f"to end within {ft['budget_minutes']:g} minutes; the last epoch took "
        f"{ft['slowdown']:.2f}x the time per image measured before fine-tuning (above 1: the "
        "machine was busier). The finetune command below gives the first epoch's number.",
        "",
    ]
