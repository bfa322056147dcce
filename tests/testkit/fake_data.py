"""A tiny fake Fashion-MNIST (IDX files) for command-line tests."""

import struct
from pathlib import Path

import numpy as np


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(directory: Path, n_train: int = 64, n_test: int = 32) -> Path:
    """Images whose brightness pattern depends on the label, so a model can learn a little."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 6, :] = 220
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(images))
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return directory
