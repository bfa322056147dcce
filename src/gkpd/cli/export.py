"""``gkpd export``: a compressed model to ONNX, and/or merged back into dense layers.

The model is resolved with :func:`gkpd.resolve.resolve_model` (a directory written by
``gkpd.save``, or any other MODEL the command line takes); the example input comes from the
``input_size`` of its card, as in ``gkpd summary``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gkpd.cli.common import CliError, check_out, command_line, emit, positive_int


def run(args: argparse.Namespace) -> int:
    from gkpd.export import merge, to_onnx
    from gkpd.models.cards import example_input, merged_card
    from gkpd.models.pretrained import save_trained
    from gkpd.resolve import resolve_model

    if args.onnx is None and args.merge_out is None:
        raise CliError("nothing to do: pass --onnx OUT.onnx and/or --merge-out DIR")
    if args.merge_out is not None:
        check_out(Path(args.merge_out), force=args.force, inputs=[args.model],
                  flag="--merge-out")
    if args.onnx is not None:
        onnx_path = Path(args.onnx)
        if onnx_path.is_dir():
            raise CliError(f"--onnx {onnx_path} is a directory; expected the .onnx file to write")
        if onnx_path.exists() and not args.force:
            raise CliError(f"--onnx {onnx_path} exists; pass --force to replace it")
    model, card = resolve_model(args.model)
    model.eval()
    x = example_input(card, args.batch)
    result: dict[str, Any] = {"model": args.model, "input_shape": list(x.shape)}
    lines = []
    if args.onnx is not None:
        from gkpd.export import OnnxVerificationError, default_opset

        opset = args.opset if args.opset is not None else default_opset()
        try:
            path = to_onnx(model, x, args.onnx, opset=opset, verify=not args.no_verify)
        except (ImportError, OnnxVerificationError) as error:
            raise CliError(str(error)) from error
        size = path.stat().st_size
        result.update({"onnx": str(path), "onnx_bytes": size, "opset": opset,
                       "verified": not args.no_verify})
        lines.append(
            f"wrote {path} ({size:,} bytes, opset {opset}, dynamic batch"
            f"{', checked in onnxruntime' if not args.no_verify else ', not verified'})"
        )
    if args.merge_out is not None:
        dense = merge(model)
        params = sum(p.numel() for p in dense.parameters())
        new_card = merged_card(
            card, merged_from=str(Path(args.model).resolve()), command=command_line()
        )
        save_trained(args.merge_out, dense, new_card)
        result.update({"merge_out": str(args.merge_out), "merged_params": params})
        lines.append(
            f"merged into dense layers ({params:,} parameters); written to {args.merge_out}"
        )
    emit(args, result, "\n".join(lines))
    return 0


def add_parser(sub, **kwargs) -> None:
    p = sub.add_parser(
        "export",
        help="export a compressed model to ONNX, or merge it back into dense layers",
        description="Export MODEL (a directory written by gkpd compress / gkpd.save) to ONNX "
        "with a dynamic batch dimension, checked in onnxruntime against PyTorch; and/or merge "
        "its Kronecker layers back into dense ones and write the dense model (loadable as a "
        "MODEL by the other commands). The example input has the shape of the card's "
        "input_size. Needs pip install 'gkpd[export]' for ONNX.",
        **kwargs,
    )
    p.add_argument("model", metavar="DIR", help="a directory written by gkpd compress")
    p.add_argument("--onnx", metavar="OUT.onnx", default=None, help="the ONNX file to write")
    p.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        help="batch size of the example input (the exported batch dimension stays dynamic)",
    )
    p.add_argument(
        "--opset", type=positive_int, default=None, help="ONNX opset (default: the newest "
        "that torch's exporter and the installed onnx support)"
    )
    p.add_argument(
        "--merge-out", metavar="DIR2", default=None,
        help="write the model merged back into dense layers to this directory",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=run)
