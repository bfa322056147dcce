"""ONNX export of a compressed ResNet-32: file size against the dense model's, and the
onnxruntime-vs-PyTorch difference, at several compression ratios.

    python benchmarks/export.py [--ratios 2 5 10] [--batch 8] [--out-dir DIR]

For each ratio the shipped Fashion-MNIST ResNet-32 is compressed with GKPD
(``gkpd.compress``), both models are exported with ``gkpd.export.to_onnx`` (dynamic batch,
checked in onnxruntime), and the script prints the file sizes, their ratio next to the
plan's parameter ratio, the share of each file that is weights, and the largest
``|onnxruntime - torch|`` on a random batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def weight_bytes(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path))
    return sum(len(t.raw_data) or t.ByteSize() for t in proto.graph.initializer)


def max_difference(path: Path, model: torch.nn.Module, x: torch.Tensor) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    return float(np.abs(got - expected).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 5.0, 10.0])
    parser.add_argument("--batch", type=int, default=8, help="batch of the difference check")
    parser.add_argument("--out-dir", type=Path, default=None, help="keep the .onnx files here")
    args = parser.parse_args(argv)

    import gkpd
    from gkpd.export import default_opset, to_onnx

    torch.manual_seed(0)
    dense = gkpd.models.load_pretrained("resnet32_fashion_mnist").eval()
    example = torch.zeros(1, 1, 28, 28)
    x = torch.randn(args.batch, 1, 28, 28)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        dense_path = to_onnx(dense, example, out / "resnet32_dense.onnx")
        dense_size = dense_path.stat().st_size
        print(f"torch {torch.__version__}, opset {default_opset()}, dynamo exporter")
        print(
            f"dense ResNet-32: {dense_size:,} bytes ({weight_bytes(dense_path):,} of weights), "
            f"max |onnxruntime - torch| {max_difference(dense_path, dense, x):.2e} "
            f"(batch {args.batch})"
        )
        header = (
            f"{'ratio':>6} {'plan':>6} {'onnx bytes':>11} {'weights':>9} {'size ratio':>10} "
            f"{'vs plan':>8} {'max diff':>9}"
        )
        print(header)
        for ratio in args.ratios:
            compressed, plan = gkpd.compress(dense, example, ratio=ratio)
            compressed.eval()
            path = to_onnx(compressed, example, out / f"resnet32_gkpd_{ratio:g}x.onnx")
            size = path.stat().st_size
            size_ratio = dense_size / size
            print(
                f"{ratio:>6g} {plan.achieved_ratio:>6.2f} {size:>11,} "
                f"{weight_bytes(path):>9,} {size_ratio:>10.2f} "
                f"{100 * (size_ratio / plan.achieved_ratio - 1):>+7.1f}% "
                f"{max_difference(path, compressed, x):>9.2e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
