"""Accuracy of every compression method at the same fine-tuning budget (`gkpd bench accuracy`).

usage:
  python benchmarks/accuracy.py [--out DIR] [--epochs N] [--train-subset N]    # Fashion-MNIST
  python benchmarks/accuracy.py --paper-cifar10 --data-dir CIFAR10_DIR [--teacher MODEL]
  add --dry-run to print the gkpd commands instead of running them

Fashion-MNIST (the recorded run): the shipped ResNet-32 teacher (resnet32_fashion_mnist)
compressed 5x and 10x by every method of gkpd.methods, plus the narrower dense `student`, each
fine-tuned with the same budget and the same distillation from the teacher.

--paper-cifar10: the setting of Hameed et al., AAAI 2022, Table 3 (ResNet-32 on CIFAR-10 at
5x: gkpd, tucker, tensor_train, tensor_ring) with the paper's accuracies beside ours. Without
--teacher it first trains the ResNet-32 teacher on CIFAR-10 (`gkpd train`, 200 epochs, in
OUT/teacher; rerunning resumes it). The fine-tuning schedule (epochs, lr, distillation) is
this project's, not the paper's. Needs CIFAR-10 (python or binary version, as
extracted from the archive) in --data-dir.

Every step is a `gkpd` command (printed before it runs); each is resumable, so running the
script again continues where it stopped and finally just prints the table.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PAPER_CIFAR10 = {
    "reference": {
        "dense": 92.55,
        "gkpd": 91.52,
        "tensor_ring": 90.6,
        "tensor_train": 88.3,
        "tucker": 87.7,
    },
    "source": "Hameed et al., AAAI 2022 (arXiv 2109.14710), Table 3: ResNet-32 on CIFAR-10 at 5x",
    "methods": ["gkpd", "tucker", "tensor_train", "tensor_ring"],
    "ratios": "5",
    "teacher_epochs": 200,
    "epochs": 200,
}
FASHION_MNIST = {
    "model": "resnet32_fashion_mnist",
    "ratios": "5,10",
    "epochs": 3,
    "train_subset": 16000,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--paper-cifar10", action="store_true",
                        help="the paper's CIFAR-10 setting instead of the Fashion-MNIST run")
    parser.add_argument("--data-dir", default=None,
                        help="data set directory (required with --paper-cifar10)")
    parser.add_argument("--teacher", default=None, metavar="MODEL",
                        help="--paper-cifar10: a trained ResNet-32 (skips training one)")
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per cell")
    parser.add_argument("--teacher-epochs", type=int, default=None,
                        help="--paper-cifar10: epochs of the teacher's training")
    parser.add_argument("--train-subset", type=int, default=None,
                        help="training samples per epoch (Fashion-MNIST run only)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (default: the configuration's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ...")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if args.paper_cifar10 and args.data_dir is None:
        parser.error("--paper-cifar10 needs --data-dir, the directory holding CIFAR-10")
    if args.paper_cifar10 and args.train_subset is not None:
        parser.error("--train-subset is for the Fashion-MNIST run; the paper setting uses all")
    if not args.paper_cifar10 and (args.teacher or args.teacher_epochs):
        parser.error("--teacher and --teacher-epochs belong to --paper-cifar10")
    for name in ("epochs", "teacher_epochs", "train_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return args


def commands(args: argparse.Namespace) -> list[list[str]]:
    """The `gkpd` command lines (without the leading `gkpd`) of the configuration."""
    common = ["--device", args.device] if args.device else []
    if not args.paper_cifar10:
        from gkpd.methods import method_names

        methods = args.methods or ",".join([*method_names(), "student"])
        out = args.out or str(HERE / "accuracy_fashion_mnist")
        data = ["--data", "fashion-mnist"]
        data += ["--data-dir", args.data_dir] if args.data_dir else []
        return [[
            "-v", "bench", "accuracy", FASHION_MNIST["model"], *data, "--methods", methods,
            "--ratios", FASHION_MNIST["ratios"],
            "--epochs", str(args.epochs or FASHION_MNIST["epochs"]),
            "--train-subset", str(args.train_subset or FASHION_MNIST["train_subset"]),
            "--out", out, *common,
        ]]
    out = Path(args.out or HERE / "accuracy_paper_cifar10")
    data = ["--data", "cifar10", "--data-dir", args.data_dir]
    steps = []
    teacher = args.teacher
    if teacher is None:
        teacher_dir = out / "teacher"
        teacher = str(teacher_dir)
        if not (teacher_dir / "model.safetensors").is_file():
            resume = ["--resume"] if (teacher_dir / "checkpoint.pt").is_file() else []
            steps.append([
                "-v", "train", "resnet32", *data,
                "--epochs", str(args.teacher_epochs or PAPER_CIFAR10["teacher_epochs"]),
                "--out", teacher, *resume, *common,
            ])
    reference = ",".join(f"{k}={v}" for k, v in PAPER_CIFAR10["reference"].items())
    steps.append([
        "-v", "bench", "accuracy", teacher, *data,
        "--methods", args.methods or ",".join(PAPER_CIFAR10["methods"]),
        "--ratios", PAPER_CIFAR10["ratios"],
        "--epochs", str(args.epochs or PAPER_CIFAR10["epochs"]),
        "--reference", reference, "--reference-source", PAPER_CIFAR10["source"],
        "--out", str(out / "bench"), *common,
    ])
    return steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = commands(args)
    for step in steps:
        print("gkpd " + " ".join(shlex.quote(a) for a in step), flush=True)
        if args.dry_run:
            continue
        from gkpd.cli import main as gkpd_main

        code = gkpd_main(step)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
