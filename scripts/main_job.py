"""The main job: compress the shipped Fashion-MNIST ResNet-32 5x with GKPD, fine-tune it with
distillation on a short CPU budget, and report accuracy, size, MACs and latency.

Run by ``scripts/main_job.sh`` after it has set up the machine; it can also be run on its own:

    python scripts/main_job.py [--epochs 3] [--train-subset N|auto] [--out out/main]

The compression and the fine-tuning are the library calls behind ``gkpd compress`` and
``gkpd finetune`` (the equivalent commands are printed and recorded); their output
directories under ``--out`` are ordinary gkpd saves (``gkpd summary``/``eval`` read them).
With ``--train-subset auto`` the images per epoch fit ``--budget-minutes``, re-checked after
every epoch (:class:`FineTuningBudget`). Writes ``report.md``, ``report.json`` and
``layers.png`` (``main_job_report``) to ``--out``.

Over 400 lines on purpose: each step is a function above ``main`` (compress, fine-tune,
latency, :func:`build_report`), which wires them in the order the README describes;
``report.json`` is assembled in one place, the record that ``report.md``
(``main_job_report``) and the tests read.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from main_job_budget import MIN_BATCHES, FineTuningBudget  # beside this script
from main_job_report import plot_layers, write_report

from gkpd import data, train
from gkpd.apply import compress
from gkpd.cli.common import positive_int
from gkpd.files import atomic_write_json
from gkpd.io import save
from gkpd.models.cards import WEIGHTS_FILE, compressed_card, example_input, finetuned_card
from gkpd.plan.budget import STRATEGIES
from gkpd.plan.objective import LatencyObjective
from gkpd.report import summary
from gkpd.resolve import resolve_model
from gkpd.timing import BUSY_CORES, CpuContention, cpu_model, free_cores, measure_latency
from gkpd.train.finetune import FINETUNE_DEFAULTS, finetune, finetune_loader

DATASET = "fashion-mnist"
TRAIN_SIZE = 60000
TEST_SIZE = 10000
STARTED = time.time()


def say(message: str) -> None:
    elapsed = time.time() - STARTED
    print(f"[main job {elapsed / 60:5.1f} min] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--teacher",
        default="resnet32_fashion_mnist",
        help="the dense model: a zoo name with shipped weights, a directory written "
        "by gkpd train, or a checkpoint.pt (default: resnet32_fashion_mnist)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="Fashion-MNIST directory (default: /usr/share/datasets/fashion-mnist)",
    )
    p.add_argument("--ratio", type=float, default=5.0)
    p.add_argument(
        "--strategy",
        choices=sorted(STRATEGIES),
        default=None,
        help="default: uniform, or near_uniform where uniform's rank steps miss the ratio",
    )
    p.add_argument(
        "--objective",
        choices=["latency", "error"],
        default="latency",
        help="latency (default): time each layer's candidate configurations on this machine "
        "and keep the fastest of those within 10%% of the least error, in the faster memory "
        "layout; error: the least error per layer",
    )
    p.add_argument(
        "--latency-batch",
        type=positive_int,
        default=64,
        help="the batch the latency objective times at (default 64: a plan timed at batch 1 "
        "runs nearly every layer as a dense convolution, as fast as dense and no faster)",
    )
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument(
        "--train-subset",
        default="auto",
        help="training images drawn per fine-tuning epoch: a number, or 'auto' (the "
        "most that fits --budget-minutes, at most all 60000, re-checked after every epoch)",
    )
    p.add_argument(
        "--budget-minutes",
        type=float,
        default=15.0,
        help="wall-clock budget of the whole job, set-up included (default 15; 0: none)",
    )
    p.add_argument(
        "--started-at",
        type=float,
        default=None,
        help="Unix time the job started (main_job.sh passes the time before set-up)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", default="out/main")
    p.add_argument("--latency-repeats", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def command(argv: list[str]) -> str:
    """The ``gkpd`` command line that does what this job does with the library, printed as
    the step starts and recorded in the model card."""
    printable = "gkpd " + shlex.join(argv)
    say(f"$ {printable}")
    return printable


THREADS_ENV = "OMP_NUM_THREADS"  # set by a user who chose the threads: never changed then
# the share of --budget-minutes the latency planning may spend timing: on a busy machine the
# timing took 10 of 15 minutes (ninth session), leaving fine-tuning its floor of batches
TIMING_SHARE = 0.2


def timing_seconds(args) -> float | None:
    """The seconds the latency objective may spend timing (``None``: no budget, no limit)."""
    return args.budget_minutes * 60 * TIMING_SHARE if args.budget_minutes > 0 else None


def compress_teacher(args, teacher, card, out: Path):
    """``gkpd compress``'s library call, saved to ``out``: ``(student, plan, card, the
    equivalent command)``."""
    strategy = ["--strategy", args.strategy] if args.strategy else []
    max_seconds = timing_seconds(args) if args.objective == "latency" else None
    latency = ["--latency-batch", str(args.latency_batch)] if args.objective == "latency" else []
    if max_seconds:
        latency += ["--latency-max-seconds", f"{max_seconds:g}"]
    compress_argv = ["compress", args.teacher, "--ratio", f"{args.ratio:g}", *strategy,
                     "--objective", args.objective, *latency, "--out", str(out), "--force"]
    compress_command = command(compress_argv)
    if args.objective == "latency":
        say("planning for latency: timing the layers' configurations on this machine"
            + (f" (at most {max_seconds / 60:.1f} min)" if max_seconds else ""))
    student, plan = compress(
        teacher, example_input(card), ratio=args.ratio, method="gkpd", strategy=args.strategy,
        objective=LatencyObjective(batch=args.latency_batch, max_seconds=max_seconds)
        if args.objective == "latency"
        else "error",
    )
    untimed = plan.options.get("latency_untimed")
    if untimed:
        say(f"timing stopped after {max_seconds / 60:.1f} min: {untimed} layer(s) keep the "
            "most accurate configuration")
    source = Path(args.teacher)
    student_card = compressed_card(
        card,
        plan,
        teacher=str(source.resolve()) if source.exists() else args.teacher,
        command=compress_command,
    )
    save(out, student, plan, card=student_card)
    return student, plan, student_card, compress_command


def test_loader(data_dir: str | None):
    from torch.utils.data import DataLoader

    return DataLoader(data.build_dataset(DATASET, "test", data_dir, augment=False), batch_size=512)


def calibrate(
    student, teacher, data_dir, batch_size: int, input_size: list[int]
) -> tuple[float, float]:
    """Seconds per training sample (student step + teacher forward) and per test sample,
    from a few batches on a throwaway copy of the student."""
    from torch.utils.data import DataLoader, Subset

    dataset = data.build_dataset(DATASET, "train", data_dir, augment=True)
    steps = max(1, min(4, len(dataset) // batch_size))
    loader = DataLoader(Subset(dataset, range(batch_size * steps)), batch_size=batch_size)
    scratch = copy.deepcopy(student)
    loop_log = logging.getLogger("gkpd.train.loop")
    level = loop_log.level
    loop_log.setLevel(logging.WARNING)  # these two passes are not the fine-tuning
    train.fit(scratch, loader, epochs=1, teacher=teacher, progress=False, device="cpu", lr=1e-4)
    started = time.perf_counter()  # second pass: warm caches, no first-call overheads
    train.fit(scratch, loader, epochs=1, teacher=teacher, progress=False, device="cpu", lr=1e-4)
    per_train = (time.perf_counter() - started) / (batch_size * steps)
    loop_log.setLevel(level)
    x = torch.zeros(512, *input_size)
    per_test = measure_latency(student, x, warmup=1, repeats=2)["median_ms"] / 1000 / 512
    return per_train, per_test


def warn_if_short(budget: FineTuningBudget) -> None:
    if budget.short:
        say(f"warning: the budget leaves no time for {MIN_BATCHES} batches per epoch; "
            "fine-tuning on them anyway (raise --budget-minutes)")


def first_draw(args, per_train: float, per_test: float,
               started_at: float) -> tuple[int, FineTuningBudget | None]:
    """The images the first fine-tuning epoch draws: ``--train-subset``, or with ``auto`` the
    most that fit ``--budget-minutes`` (with the :class:`FineTuningBudget` that re-checks
    them after every epoch; all images where there is no budget)."""
    if args.train_subset != "auto":
        return int(args.train_subset), None
    if args.budget_minutes <= 0:
        return TRAIN_SIZE, None
    budget = FineTuningBudget(
        deadline=started_at + args.budget_minutes * 60, epochs=args.epochs,
        batch_size=args.batch_size, seconds_per_image=per_train,
        seconds_per_eval=TEST_SIZE * per_test, max_images=TRAIN_SIZE,
    )
    return budget.images(time.time()), budget


def fine_tune(args, student, teacher, eval_loader, out: Path, subset: int,
              budget: FineTuningBudget | None) -> tuple[list[dict[str, Any]], list[int]]:
    """``gkpd finetune``'s library call, drawing ``subset`` images per epoch; with a
    ``budget``, an epoch that runs late stops early and the budget is re-checked after each
    epoch, which resizes the next epochs' draw. Returns the history and the images each
    epoch trained."""
    train_loader = finetune_loader(
        DATASET, args.data_dir, batch_size=args.batch_size, train_subset=subset
    )
    draw = train_loader.sampler
    images: list[int] = []

    def after_epoch(record: dict[str, Any]) -> None:
        trained = draw.drawn // args.batch_size * args.batch_size  # whole batches only
        images.append(trained)
        if budget is None:
            return
        if trained < draw.samples:
            say(f"epoch {record['epoch']}: stopped after {trained:,} of {draw.samples:,} "
                "images to end within --budget-minutes")
        fits = budget.epoch_done(trained, record["seconds"], time.time())
        if fits:
            warn_if_short(budget)
        if fits and fits != draw.samples:
            say(
                f"epoch {record['epoch']}: {budget.seconds_per_image * 1000:.1f} ms per "
                f"training image ({budget.slowdown:.2f}x the estimate); the next epochs draw "
                f"{fits:,} images to end within --budget-minutes {args.budget_minutes:g}"
            )
        draw.samples = fits or draw.samples

    if budget is not None:
        budget.max_images = len(train_loader.dataset)
        budget.start(time.time())
        draw.stop = lambda drawn: budget.must_stop(drawn, time.time())
    history = finetune(
        student,
        teacher,
        train_loader,
        epochs=args.epochs,
        eval_loader=eval_loader,
        checkpoint_dir=out,
        resume=False,
        device="cpu",
        progress=not args.no_progress,
        lr=args.lr,
        after_epoch=after_epoch,
    )
    return history, images


def latencies(dense, compressed, repeats: int) -> dict[str, Any]:
    """Median CPU latency at batch 1 and 64, the models measured in alternating rounds: the
    dense model in both memory layouts (its speed is the faster one's, so that the speed-up
    is honest), the compressed one called plainly (it runs in the layout its plan chose)."""
    dense_channels_last = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    for batch, reps in ((1, repeats * 5), (64, repeats)):
        x = torch.randn(batch, 1, 28, 28)
        runs = {"dense": (dense, x), "compressed": (compressed, x),
                "dense channels_last": (dense_channels_last,
                                        x.contiguous(memory_format=torch.channels_last))}
        rounds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(3):
            for name, (model, inputs) in runs.items():
                timing = measure_latency(model, inputs, warmup=2, repeats=max(1, reps // 3))
                rounds[name].append(timing["median_ms"])
        medians = {name: sorted(values)[1] for name, values in rounds.items()}
        layout = min(("contiguous", "dense"), ("channels_last", "dense channels_last"),
                     key=lambda option: medians[option[1]])
        entry = {"dense": medians[layout[1]], "dense_layout": layout[0],
                 "dense_by_layout": {"contiguous": medians["dense"],
                                     "channels_last": medians["dense channels_last"]},
                 "compressed": medians["compressed"]}
        entry["speedup"] = entry["dense"] / entry["compressed"]
        result[f"batch_{batch}"] = entry
    return result


@dataclass
class FineTuned:
    """What the fine-tuning step did: its history, the images each epoch trained, the first
    draw, the budget that re-checked it, the measured seconds per training image, the
    equivalent ``gkpd finetune`` command and the model card it saved with."""

    history: list[dict[str, Any]]
    images: list[int]
    subset: int
    budget: FineTuningBudget | None
    seconds_per_image: float
    command: str
    card: dict[str, Any]


def finetune_student(args, student, teacher, loader, plan, student_card, input_size: list[int],
                     compressed_dir: Path, finetuned_dir: Path, started_at: float) -> FineTuned:
    """``gkpd finetune``'s step: time a few batches, fit the first epoch's draw to the budget,
    fine-tune with distillation (re-checking the budget every epoch) and save the result to
    ``finetuned_dir``."""
    per_train, per_test = calibrate(
        student, teacher, args.data_dir, args.batch_size, input_size
    )
    subset, budget = first_draw(args, per_train, per_test, started_at)
    if budget is not None:
        warn_if_short(budget)
    estimate = args.epochs * (subset * per_train + TEST_SIZE * per_test) / 60
    say(
        f"fine-tuning: {per_train * 1000:.1f} ms per training image, so {args.epochs} epochs "
        f"of {subset:,} images (about {estimate:.1f} min"
        + (", re-checked after every epoch)" if budget else ")")
    )
    data_dir = ["--data-dir", args.data_dir] if args.data_dir else []
    progress = ["--no-progress"] if args.no_progress else []
    finetune_command = command([
        "finetune", str(compressed_dir), "--teacher", args.teacher, "--data", DATASET,
        *data_dir, "--epochs", str(args.epochs), "--train-subset", str(subset),
        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--out",
        str(finetuned_dir), "--force", "--device", "cpu", *progress,
    ])
    history, images = fine_tune(args, student, teacher, loader, finetuned_dir, subset, budget)
    card = finetuned_card(
        student_card,
        {
            "source": str(compressed_dir.resolve()),
            "teacher": args.teacher,
            "distillation": True,
            "alpha": FINETUNE_DEFAULTS["alpha"],
            "temperature": FINETUNE_DEFAULTS["temperature"],
            "epochs": args.epochs,
            "lr": args.lr,
            "weight_decay": FINETUNE_DEFAULTS["weight_decay"],
            "batch_size": args.batch_size,
            "train_subset": subset,
            "images_per_epoch": images,
            "seed": 0,
            "history": history,
        },
        command=finetune_command,
    )
    save(finetuned_dir, student.cpu(), plan, card=card)
    return FineTuned(history, images, subset, budget, per_train, finetune_command, card)


def fit_threads_to_load(others_cores: float | None) -> dict[str, Any]:
    """Fewer torch threads when other processes keep cores busy (:func:`free_cores`), unless
    the user chose the number (``OMP_NUM_THREADS``); what was done, for the report."""
    started = torch.get_num_threads()
    free = free_cores(others_cores)
    result = {"started": started, "used": started, "chosen_by_user": THREADS_ENV in os.environ}
    if free is not None and free < started and not result["chosen_by_user"]:
        say(f"other processes keep {others_cores:.1f} of the {os.cpu_count()} cores busy: "
            f"running on {free} thread(s) instead of {started}, which would wait on each other "
            f"(set {THREADS_ENV} to choose)")
        torch.set_num_threads(free)
        result["used"] = free
    return result


def busy_steps(others: dict[str, float | None]) -> list[str]:
    """The steps during which other processes kept at least ``BUSY_CORES`` busy."""
    return [step for step, cores in others.items() if cores is not None and cores >= BUSY_CORES]


def describe_others(others: dict[str, float | None], steps: list[str]) -> str:
    """``"1.4 during fine-tuning, 0.9 during latency"``."""
    return ", ".join(f"{others[step]:.1f} during {step.replace('_', '-')}" for step in steps)


def dense_weights_bytes(model) -> int:
    """The bytes of ``model``'s weights in the safetensors format that gkpd train (and the
    shipped model) write."""
    return len(safetensors.torch.save(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    ))


def build_report(args, *, out: Path, plan, accuracy: dict[str, Any], dense_summary,
                 compressed_summary, dense_bytes: int, finetuned_dir: Path, latency: dict,
                 tuned: FineTuned, compress_command: str, compressed_dir: Path,
                 plotted: bool, started_at: float,
                 others: dict[str, float | None], threads: dict[str, Any]) -> dict[str, Any]:
    """``report.json``: every figure the job measured, the commands, the machine."""
    longer_epochs = 30
    budget = tuned.budget
    report: dict[str, Any] = {
        "teacher": args.teacher,
        "dataset": DATASET,
        "accuracy": accuracy,
        "size": {
            "dense_params": dense_summary.total_params,
            "params": compressed_summary.total_params,
            "param_ratio": dense_summary.total_params / compressed_summary.total_params,
            "dense_macs": dense_summary.total_macs,
            "macs": compressed_summary.total_macs,
            "mac_ratio": dense_summary.total_macs / compressed_summary.total_macs,
            "compressed_layers": len(plan.compressed_layers),
            "layers": len(plan.layers),
            "plan_ratio": plan.achieved_ratio,
            "dense_bytes": dense_bytes,
            "bytes": (finetuned_dir / WEIGHTS_FILE).stat().st_size,
        },
        "latency": latency,
        "finetune": {
            "epochs": args.epochs,
            "train_subset": tuned.subset,
            "images_per_epoch": tuned.images,
            "train_images": TRAIN_SIZE,
            "budget_minutes": args.budget_minutes if budget else None,
            "slowdown": budget.slowdown if budget else None,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seconds_per_train_image": tuned.seconds_per_image,
            "history": tuned.card["finetune"]["history"],
        },
        "layers": [
            {
                "name": e.name,
                "compressed": e.compressed,
                "a_shape": e.settings.get("a_shape"),
                "b_shape": e.settings.get("b_shape"),
                "rank": e.settings.get("rank"),
                "params": e.params,
                "dense_params": e.dense_params,
                "macs": e.macs,
                "dense_macs": e.dense_macs,
                "relative_error": e.relative_error,
                "reason": e.reason,
            }
            for e in plan.layers
        ],
        "commands": {"compress": compress_command, "finetune": tuned.command},
        "longer_run": (
            f"gkpd finetune {shlex.quote(str(compressed_dir))} --teacher "
            f"{shlex.quote(args.teacher)} --data {DATASET} --epochs {longer_epochs} "
            f"--out {shlex.quote(str(out / 'finetuned_long'))}"
        ),
        "longer_run_main_job": (
            f"bash scripts/main_job.sh --epochs {longer_epochs} --train-subset {TRAIN_SIZE} "
            f"--budget-minutes 0 --out out/main_long"
        ),
        "plot": plotted,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            # cores other processes kept busy on average during each step (None: unknown)
            "other_processes_cores": others,
            "busy_steps": busy_steps(others),
            "busy_cores": BUSY_CORES,
            "threads": threads,
        },
        "setup_included": args.started_at is not None,
    }
    report["size"]["bytes_ratio"] = report["size"]["dense_bytes"] / report["size"]["bytes"]
    report["wall_minutes"] = (time.time() - started_at) / 60
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gkpd.train.loop").setLevel(logging.INFO)  # one line per epoch
    global STARTED
    if args.started_at:  # the clock of the progress lines includes the set-up
        STARTED = args.started_at
    started_at = STARTED
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    compressed_dir, finetuned_dir = out / "compressed", out / "finetuned"
    progress = not args.no_progress
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads; output in {out}")

    say(f"loading the teacher {args.teacher}")
    teacher, card = resolve_model(args.teacher)
    loader = test_loader(args.data_dir)
    others: dict[str, float | None] = {}  # cores other processes kept busy, per step
    contention = CpuContention()
    dense_eval = train.evaluate(teacher, loader, device="cpu", progress=progress)
    others["dense_evaluation"] = contention.others_cores()
    say(f"dense test accuracy {dense_eval['accuracy']:.2f}%")
    threads = fit_threads_to_load(others["dense_evaluation"])

    contention.start()
    student, plan, student_card, compress_command = compress_teacher(
        args, teacher, card, compressed_dir)
    others["planning"] = contention.others_cores()
    print(f"{plan.table()}\nwritten to {compressed_dir}")
    before = train.evaluate(student, loader, device="cpu", progress=progress)
    say(f"compressed, before fine-tuning: test accuracy {before['accuracy']:.2f}%")

    contention.start()
    tuned = finetune_student(args, student, teacher, loader, plan, student_card,
                             card["input_size"], compressed_dir, finetuned_dir, started_at)
    others["fine_tuning"] = contention.others_cores()
    finetuned = student.cpu()
    after = tuned.history[-1]["eval_accuracy"]
    print(
        f"fine-tuned {compressed_dir} for {len(tuned.history)} epochs with distillation from "
        f"{args.teacher}: test accuracy {after:.2f}%; written to {finetuned_dir}"
    )

    say("measuring CPU latency at batch 1 and 64 (dense and compressed alternately)")
    contention.start()
    lat = latencies(teacher, finetuned, args.latency_repeats)
    others["latency"] = contention.others_cores()
    busy = busy_steps(others)
    if busy:
        say(f"the machine was busy: other processes kept cores busy "
            f"({describe_others(others, busy)}); this run's times are slower than a quiet "
            "machine's")
    plotted = plot_layers(plan, out / "layers.png")
    if not plotted:
        say("matplotlib is not installed (pip install -e '.[plot]'): no plot")
    report = build_report(
        args, out=out, plan=plan,
        accuracy={"dense": dense_eval["accuracy"], "before_finetune": before["accuracy"],
                  "after_finetune": after, "gap": after - dense_eval["accuracy"],
                  "test_images": dense_eval["count"]},
        dense_summary=summary(teacher, example_input(card)),
        compressed_summary=summary(finetuned, example_input(card)),
        dense_bytes=dense_weights_bytes(teacher), finetuned_dir=finetuned_dir, latency=lat,
        tuned=tuned, compress_command=compress_command, compressed_dir=compressed_dir,
        plotted=plotted, started_at=started_at, others=others, threads=threads,
    )
    atomic_write_json(out / "report.json", report, indent=2)
    write_report(out, report, plan)
    say(
        f"accuracy dense {dense_eval['accuracy']:.2f}% -> compressed {before['accuracy']:.2f}% "
        f"-> fine-tuned {after:.2f}%; params {report['size']['param_ratio']:.2f}x fewer, MACs "
        f"{report['size']['mac_ratio']:.2f}x fewer; batch-1 latency "
        f"{lat['batch_1']['dense']:.2f} -> {lat['batch_1']['compressed']:.2f} ms"
    )
    say(
        f"wrote {out / 'report.md'}, {out / 'report.json'}"
        + (f", {out / 'layers.png'}" if plotted else "")
    )
    if report["wall_minutes"] > args.budget_minutes > 0:
        say(f"note: the job took longer than --budget-minutes {args.budget_minutes:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
