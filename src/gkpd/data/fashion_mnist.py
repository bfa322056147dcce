"""Fashion-MNIST from the IDX files (as Debian's ``dataset-fashion-mnist`` installs them)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from gkpd.files import existing_dir

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "install it with `apt-get install dataset-fashion-mnist` (files under "
    f"{DEFAULT_DIR}) or pass a directory holding train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]"
)
_PREFIX = {"train": "train", "test": "t10k"}


def _open_idx(directory: Path, stem: str) -> bytes:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            try:
                with opener(candidate, "rb") as handle:
                    return handle.read()
            except (OSError, EOFError, zlib.error) as error:  # zlib: corrupt gzip data
                raise ValueError(f"cannot read {candidate}: {error}; {HOW_TO_GET}") from error
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}; {HOW_TO_GET}"
    )


def parse_idx(raw: bytes, source: str) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (type code 0x08) into an array of its shape."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{source} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(
            f"{source} is truncated or corrupt: header says shape {shape} "
            f"({expected} bytes), file has {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_arrays(
    split: str, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, 28, 28) and int64 labels of the ``train`` or ``test`` split."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = existing_dir(Path(data_dir) if data_dir is not None else DEFAULT_DIR,
                             "Fashion-MNIST directory", HOW_TO_GET)
    prefix = _PREFIX[split]
    images_stem, labels_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    images = parse_idx(_open_idx(directory, images_stem), str(directory / images_stem))
    labels = parse_idx(_open_idx(directory, labels_stem), str(directory / labels_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{directory / images_stem} holds images of shape {images.shape[1:]}, expected (28, 28)"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{directory / labels_stem} holds {labels.shape} labels for {images.shape[0]} images"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{directory / labels_stem} has label {labels.max()}, expected 0..9")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
