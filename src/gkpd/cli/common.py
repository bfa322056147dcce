"""What the subcommands share: the error they raise, output, argument types and groups, and
the checks of an output directory. Every subcommand module imports only this one."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shlex
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("gkpd")

MODEL_HELP = (
    "a zoo name with shipped weights (e.g. resnet32_fashion_mnist), a directory written by "
    "gkpd train or gkpd compress, or a checkpoint.pt"
)


class CliError(Exception):
    """A user-facing error: printed as one line, exit status :attr:`status`."""

    status = 2


class Interrupted(CliError):
    """Ctrl-C: one line, exit status 130 (128 + SIGINT, as shells report it)."""

    status = 130


# the command-line flag of a setting that gkpd.train.ResumeMismatch names, where it is not
# the setting's name with dashes
_SETTING_FLAGS = {"samples_per_epoch": "--train-subset", "distillation": "--no-distill",
                  "teacher": "--teacher", "feature_pairs": "--feature-layers"}


def _described_change(name: str, recorded: Any, given: Any) -> str:
    """One changed setting of a refused --resume, by the flag that sets it."""
    if name == "distillation":  # a flag that is present or not: say which run was which
        started = "with" if recorded else "without"
        return f"--no-distill: the run was started {started} distillation"
    if name == "teacher":  # digests of the weights: saying that they differ is enough
        return "--teacher: the run distils from another teacher"
    flag = _SETTING_FLAGS.get(name, "--" + name.replace("_", "-"))
    return f"{flag} ({name}): {recorded!r} recorded, {given!r} given"


@contextmanager
def resumable(out: Path, *, resume: bool, force: bool = False) -> Iterator[None]:
    """Around a run that checkpoints in ``out``: Ctrl-C becomes :class:`Interrupted`, saying
    which checkpoint is kept and the command that continues from it; ``--resume`` with other
    settings than the checkpoint's becomes a :class:`CliError` naming their flags. With
    ``force`` (start over) the run and model in ``out`` are removed first: an interrupted new
    run must not leave the old model beside its checkpoint."""
    from gkpd.io import MANIFEST_FILE, PLAN_FILE
    from gkpd.models.cards import CARD_FILE, WEIGHTS_FILE
    from gkpd.train import distributed
    from gkpd.train.checkpoint import ResumeMismatch, load_state
    from gkpd.train.loop import CHECKPOINT_NAME, METRICS_NAME

    path = out / CHECKPOINT_NAME
    if force and distributed.is_main_process():
        for name in (MANIFEST_FILE, PLAN_FILE, WEIGHTS_FILE, CARD_FILE, CHECKPOINT_NAME,
                     METRICS_NAME):
            (out / name).unlink(missing_ok=True)
    before = path.stat().st_mtime_ns if path.is_file() else None
    try:
        yield
    except ResumeMismatch as error:
        changes = "; ".join(_described_change(name, recorded, given)
                            for name, (recorded, given) in error.changes.items())
        raise CliError(
            f"--resume: the run in {out} was started with other settings ({changes}); "
            "rerun with the recorded values, or start over in another --out"
        ) from None
    except KeyboardInterrupt:
        # a checkpoint this run neither wrote nor resumes is another run's (--force)
        if not path.is_file() or (not resume and path.stat().st_mtime_ns == before):
            raise Interrupted(
                f"interrupted before the first epoch ended; nothing to resume in {out}"
            ) from None
        epoch = load_state(path)["epoch"]
        # the run is the one to continue now: --resume, not --force
        kept = [a for a in sys.argv[1:] if a != "--force"]
        again = command_line(kept) + ("" if "--resume" in kept else " --resume")
        raise Interrupted(
            f"interrupted; the checkpoint of epoch {epoch} is kept in {path}; continue with: "
            f"{again}"
        ) from None


def emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """Print ``result`` as one JSON object under ``--json``, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(result))
    else:
        print(text)


def command_line(arguments: list[str] | None = None) -> str:
    """This process's command line (or the command with ``arguments``), as the ``command`` of
    a model card."""
    return "gkpd " + " ".join(shlex.quote(a) for a in
                              (sys.argv[1:] if arguments is None else arguments))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _number(text: str) -> float:
    """``float(text)``, NaN (refused by every check below) where it is not a number."""
    try:
        return float(text)
    except ValueError:
        return math.nan


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def slack(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _has_default(action: argparse.Action) -> bool:
    """Whether ``--help`` has a default to show: not None, a flag's False or SUPPRESS (``is``,
    not ``in``: a default of 0 equals False and must still be shown)."""
    return not any(action.default is value for value in (None, False, argparse.SUPPRESS))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, where its help does not already name one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not _has_default(action) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and _has_default(action):
            # an option without help still shows its default
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def subparser_options() -> dict[str, Any]:
    """Keywords of every ``add_parser``: defaults in ``--help``, and ``-v/--verbose`` accepted
    after the subcommand as well as before it."""
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
        help="log progress to stderr",
    )
    return {"parents": [verbose], "formatter_class": HelpFormatter}


def distillation_args(parser: argparse.ArgumentParser) -> None:
    """The distillation flags of ``gkpd finetune`` and ``gkpd bench accuracy``."""
    parser.add_argument("--alpha", type=fraction, default=0.9,
                        help="weight of the distillation term")
    parser.add_argument("--temperature", type=positive_float, default=4.0,
                        help="distillation temperature")
    parser.add_argument(
        "--feature-layers", action="append", default=None, metavar="PATTERN",
        help="also distil the outputs of these modules (a name, a type such as BasicBlock, or "
        "a regex re:layer\\d\\.\\d+; repeatable) from the teacher's modules of the same "
        "name, by mean squared error",
    )
    parser.add_argument("--feature-weight", type=non_negative_float, default=1.0,
                        help="weight of the --feature-layers term")


def data_args(parser: argparse.ArgumentParser) -> None:
    from gkpd.data import dataset_names

    parser.add_argument("--data", required=True, choices=dataset_names(), help="data set")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory of the data set "
        "(default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    )


def device(text: str) -> str:
    """A torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ...)."""
    import torch

    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:1, got {text!r}"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return text


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=device, default=None, help="cpu, cuda, cuda:1 (default: cuda if present)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def model_dir(spec: str) -> Path | None:
    """The resolved path of a MODEL that is a path, else ``None`` (a zoo name)."""
    path = Path(spec)
    return path.resolve() if path.exists() else None


def _refuse_a_file(out: Path, flag: str) -> None:
    """An output directory (the option ``flag``) that is a file, or would be inside one."""
    if out.exists() and not out.is_dir():
        raise CliError(f"{flag} {out} exists and is not a directory")
    if not out.exists() and any(p.exists() and not p.is_dir() for p in out.parents):
        raise CliError(f"{flag} {out} is inside a file, not a directory")


def writable_dir(out: Path, flag: str = "--out") -> Path:
    """``out``, created if need be, once a file could be written in it."""
    _refuse_a_file(out, flag)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise CliError(f"{flag} {out} cannot be written: {error}") from None
    return out


def check_out(out: Path, *, force: bool, inputs: list[str], resume: bool | None = None,
              flag: str = "--out") -> None:
    """Refuse an output directory (the option ``flag``) that is an input, is a file, or
    already holds a model or a run (unless ``force``); with ``resume``, one that holds no run
    to continue. ``resume=None``: the command has no --resume."""
    from gkpd.io import is_saved_model
    from gkpd.models.cards import WEIGHTS_FILE
    from gkpd.train.loop import CHECKPOINT_NAME

    if resume and force:
        raise CliError(f"--resume continues the run in {flag} and --force starts over: "
                       "pass one")
    _refuse_a_file(out, flag)
    for spec in inputs:
        source = model_dir(spec)
        if source is not None and source in (out.resolve(), out.resolve() / WEIGHTS_FILE):
            raise CliError(f"{flag} {out} is an input of this command; pick another directory")
    if resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise CliError(
                f"--resume: {flag} {out} holds no training run to continue (no "
                f"{CHECKPOINT_NAME}); drop --resume to start one"
            )
        return
    if force:
        return
    if (out / CHECKPOINT_NAME).exists():
        continue_it = "pass --resume to continue it, " if resume is not None else ""
        raise CliError(
            f"{flag} {out} already holds a training run; {continue_it}pass --force to start "
            "over, or pick another directory"
        )
    if is_saved_model(out) or (out / WEIGHTS_FILE).exists():
        raise CliError(
            f"{flag} {out} already holds a model; pass --force to replace it or pick another "
            "directory"
        )


def training_run(args: argparse.Namespace, out: Path, eval_loader) -> dict[str, Any]:
    """The keywords of :func:`gkpd.train.fit` (and ``finetune``) that the flags ``gkpd
    train`` and ``gkpd finetune`` share set: epochs, evaluation, checkpoints in ``out`` and
    resuming, device, progress bars, learning rate, weight decay and seed."""
    return {
        "epochs": args.epochs,
        "eval_loader": eval_loader,
        "checkpoint_dir": out,
        "resume": args.resume,
        "device": args.device,
        "progress": not args.no_progress,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }


def fine_tuning_loaders(args: argparse.Namespace, card: dict[str, Any], doing: str):
    """``(train_loader, test_loader)`` of ``--data`` for fine-tuning the model of ``card``,
    after :func:`check_data` (``doing``: what the command does on the data, for its
    warning)."""
    from torch.utils.data import DataLoader

    from gkpd import data
    from gkpd.train.finetune import finetune_loader

    check_data(card, args.data, doing)
    train_loader = finetune_loader(
        args.data,
        args.data_dir,
        batch_size=args.batch_size,
        train_subset=args.train_subset,
        workers=args.workers,
    )
    test = data.build_dataset(args.data, "test", args.data_dir, augment=False)
    check_classes(card, test, args.data)
    return train_loader, DataLoader(test, batch_size=512, num_workers=args.workers)


def classes_of(dataset, data: str) -> int:
    """The number of classes of ``dataset`` (of the data set named ``data``): an image
    folder's own (its class folders), else the registry's."""
    from gkpd.data import get_info

    return len(getattr(dataset, "classes", ()) or ()) or get_info(data).num_classes


def check_classes(card: dict[str, Any], dataset, data: str) -> None:
    """Refuse a data set whose labels go past the outputs of the model of ``card``: they
    failed deep in the loss (``Target 21 is out of bounds``)."""
    outputs = (card.get("model_kwargs") or {}).get("num_classes")
    classes = classes_of(dataset, data)
    if outputs is not None and classes > outputs:
        raise CliError(f"--data {data} has {classes} classes, but the model has {outputs} "
                       f"outputs{_trained_on(card)}")


def _trained_on(card: dict[str, Any]) -> str:
    """``"; it was trained on DATA"`` for an error's end, where the card says."""
    return f"; it was trained on {card['dataset']}" if card.get("dataset") else ""


def check_data(card: dict[str, Any], data: str, doing: str) -> None:
    """Refuse the data set ``data`` when its images have another number of channels than
    the model of ``card`` takes; warn when the model was trained on another data set or
    normalization (``doing``: what the command does on the data, e.g. "evaluating")."""
    from gkpd.data import get_info

    info = get_info(data)
    size = card.get("input_size")
    channels = size[0] if isinstance(size, list) and size else (
        card.get("model_kwargs") or {}
    ).get("in_channels")
    if channels is not None and channels != info.in_channels:
        raise CliError(
            f"the model takes {channels}-channel inputs, but --data {data} has "
            f"{info.in_channels}-channel images{_trained_on(card)}"
        )
    if card.get("dataset") not in (None, data):
        log.warning("model was trained on %s, %s on %s", card["dataset"], doing, data)
    norm = card.get("normalization")
    if norm and (tuple(norm["mean"]), tuple(norm["std"])) != (info.mean, info.std):
        log.warning("model was trained with normalization %s; %s uses mean %s, std %s", norm,
                    data, list(info.mean), list(info.std))
