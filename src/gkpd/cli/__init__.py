"""The ``gkpd`` command: each subcommand mirrors a library call."""

from __future__ import annotations

import argparse
import logging
import sys

from gkpd.cli import bench, compress, evaluate, export, finetune, summary, train
from gkpd.cli.common import CliError, HelpFormatter, subparser_options

__all__ = ["build_parser", "main"]

# in the order of `gkpd --help`
SUBCOMMANDS = (train, evaluate, compress, finetune, summary, export, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gkpd", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    options = subparser_options()
    for module in SUBCOMMANDS:
        module.add_parser(sub, **options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except CliError as error:
        return _fail(args, error, error.status)
    # ImportError: an optional dependency is missing; the library's message names the extra.
    # OSError: a path that cannot be read or written (its message names it). FloatingPointError:
    # training diverged (the message says where; the last checkpoint is kept).
    except (ValueError, TypeError, OSError, ImportError, FloatingPointError) as error:
        return _fail(args, error, 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    finally:
        _leave_process_group()


def _fail(args: argparse.Namespace, error: Exception | str, status: int) -> int:
    command = " ".join(filter(None, (args.command, getattr(args, "benchmark", None))))
    text = str(error).strip()
    if "Original Traceback" in text:  # a DataLoader worker's: torch puts its traceback in
        text = text.splitlines()[-1]  # the message; its last line is the error
    print(f"gkpd {command}: error: {text}", file=sys.stderr)
    return status


def _leave_process_group() -> None:
    """Under torchrun, leave the process group cleanly: a rank that exits with gloo's threads
    alive can abort."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
