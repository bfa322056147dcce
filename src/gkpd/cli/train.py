"""``gkpd train``: train a zoo architecture from scratch and write its weights and card."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gkpd.cli.common import (
    CliError,
    check_out,
    classes_of,
    command_line,
    common_args,
    data_args,
    emit,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resumable,
    training_run,
)


def run(args: argparse.Namespace) -> int:
    import torch

    from gkpd import data, models, train
    from gkpd.models.cards import now
    from gkpd.models.pretrained import save_trained
    from gkpd.train import distributed

    info = data.get_info(args.data)
    out = Path(args.out)
    check_out(out, force=args.force, inputs=[], resume=args.resume)
    architecture = models.canonical_name(args.model)  # the card records the zoo's name
    train_loader, test_loader = data.build_loaders(
        args.data, args.data_dir, batch_size=args.batch_size, num_workers=args.workers
    )
    # an image folder has its own classes (the registry's 1000 are ImageNet's)
    classes = classes_of(train_loader.dataset, args.data)
    model_kwargs = {"num_classes": classes, "in_channels": info.in_channels}
    model = models.create(architecture, **model_kwargs)
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)),
                None)
    item_dims = len(info.input_size) - 1
    if conv is not None and len(conv.kernel_size) != item_dims:
        raise CliError(
            f"{architecture} takes {len(conv.kernel_size)}-d inputs, but --data {args.data} "
            f"has {item_dims}-d items ({'clips' if info.frames else 'images'} of "
            f"{info.input_size}): pick a model of the data's kind"
        )
    card: dict[str, Any] = {
        "architecture": architecture,
        "model_kwargs": model_kwargs,
        "dataset": args.data,
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "input_size": info.input_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "hyperparameters": {
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": args.schedule,
            "label_smoothing": args.label_smoothing,
            "momentum": 0.9,
            "nesterov": True,
            "augmentation": (
                f"random crop (padding {info.crop_padding}) + horizontal flip"
                if info.crop_padding
                else "random crop while decoding + horizontal flip"
            ),
        },
        "command": command_line(),
        "torch_version": torch.__version__,
    }
    with resumable(out, resume=args.resume, force=args.force):
        history = train.fit(
            model,
            train_loader,
            **training_run(args, out, test_loader),
            schedule=args.schedule,
            label_smoothing=args.label_smoothing,
        )
    final = history[-1]
    card["test_accuracy"] = final["eval_accuracy"]
    card["created"] = now()
    if not distributed.is_main_process():  # under torchrun, one process writes and reports
        return 0
    save_trained(out, model, card)
    result = {"out": str(out), "epochs": len(history), "test_accuracy": final["eval_accuracy"]}
    emit(
        args,
        result,
        f"trained {architecture} on {args.data}: test accuracy "
        f"{final['eval_accuracy']:.2f}% after {len(history)} epochs; written to {out}",
    )
    return 0


def add_parser(sub, **kwargs) -> None:
    p = sub.add_parser(
        "train",
        help="train a zoo model from scratch",
        description="Train a gkpd.models architecture on a data set.",
        **kwargs,
    )
    p.add_argument("model", metavar="MODEL_NAME", help="a gkpd.models name, e.g. resnet32")
    data_args(p)
    p.add_argument("--epochs", type=positive_int, required=True)
    p.add_argument("--out", required=True, help="directory for checkpoints, metrics and weights")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--weight-decay", type=non_negative_float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--label-smoothing", type=fraction, default=0.0)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="data loader worker processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--force", action="store_true", help="start over in an --out that holds a run or a model"
    )
    common_args(p)
    p.set_defaults(handler=run)
