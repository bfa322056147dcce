"""CIFAR-10 and CIFAR-100 from the archives of https://www.cs.toronto.edu/~kriz/cifar.html.

Both the "python version" (pickled batches) and the "binary version" are read. The pickles are
never loaded with an unrestricted unpickler: :class:`NumpyOnlyUnpickler` resolves only the few
numpy globals needed to rebuild arrays and refuses every other global, so a crafted file cannot
run code. Expected layouts (``data_dir`` may be the extracted folder or the folder holding it)::

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch
    cifar-10-batches-bin/  data_batch_1.bin .. data_batch_5.bin, test_batch.bin
    cifar-100-python/      train, test
    cifar-100-binary/      train.bin, test.bin
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gkpd.files import existing_dir

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _Variant:
    title: str
    num_classes: int
    python_folder: str
    binary_folder: str
    python_files: dict[str, tuple[str, ...]]
    binary_files: dict[str, tuple[str, ...]]
    label_key: bytes
    label_bytes: int  # label bytes before each binary record; the last one is the class
    archive: str


CIFAR10 = _Variant(
    title="CIFAR-10",
    num_classes=10,
    python_folder="cifar-10-batches-py",
    binary_folder="cifar-10-batches-bin",
    python_files={
        "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test": ("test_batch",),
    },
    binary_files={
        "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test": ("test_batch.bin",),
    },
    label_key=b"labels",
    label_bytes=1,
    archive="cifar-10-python.tar.gz",
)
CIFAR100 = _Variant(
    title="CIFAR-100",
    num_classes=100,
    python_folder="cifar-100-python",
    binary_folder="cifar-100-binary",
    python_files={"train": ("train",), "test": ("test",)},
    binary_files={"train": ("train.bin",), "test": ("test.bin",)},
    label_key=b"fine_labels",
    label_bytes=2,  # coarse label, then fine label
    archive="cifar-100-python.tar.gz",
)
_VARIANTS = {10: CIFAR10, 100: CIFAR100}


def _how_to_get(variant: _Variant) -> str:
    py = ", ".join(variant.python_files["train"] + variant.python_files["test"])
    binary = ", ".join(variant.binary_files["train"] + variant.binary_files["test"])
    return (
        f"expected {variant.python_folder}/ ({py}) or {variant.binary_folder}/ ({binary}), "
        f"either the folder itself or its parent; download {variant.archive} (python version) "
        f"from {URL} and extract it with `tar xzf {variant.archive}`"
    )


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 pickles of bytes at protocol < 3 call _codecs.encode(text, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, lists, dicts and strings, and nothing else."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            )
        return factory()


def restricted_load(raw: bytes, source: str) -> object:
    """Unpickle ``raw`` (read from ``source``) allowing only numpy array globals."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            AttributeError, IndexError, OverflowError, MemoryError) as error:
        raise ValueError(f"{source} is not a CIFAR python batch: {error}") from error


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _find_folder(variant: _Variant, data_dir: str | Path | None) -> tuple[Path, str]:
    """The folder holding the batches and its format, ``"python"`` or ``"binary"``."""
    if data_dir is None:
        raise ValueError(
            f"{variant.title} has no default location; pass data_dir (--data-dir): "
            + _how_to_get(variant)
        )
    root = existing_dir(Path(data_dir), f"{variant.title} data_dir", _how_to_get(variant))
    formats = (
        ("python", variant.python_folder, variant.python_files),
        ("binary", variant.binary_folder, variant.binary_files),
    )
    partial: list[str] = []
    for fmt, folder, files in formats:
        for candidate in (root / folder, root):
            wanted = files["train"] + files["test"]
            present = [name for name in wanted if (candidate / name).is_file()]
            if len(present) == len(wanted):
                return candidate, fmt
            if present:
                missing = [name for name in wanted if name not in present]
                partial.append(f"{candidate} lacks {', '.join(missing)}")
    detail = "; ".join(partial) if partial else f"no {variant.title} batches in {root}"
    if (root / variant.archive).is_file():
        detail += f" ({root / variant.archive} is still packed: extract it first)"
    raise FileNotFoundError(f"{detail}; " + _how_to_get(variant))


def _check_arrays(data: np.ndarray, labels: np.ndarray, variant: _Variant, source: str) -> None:
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise ValueError(
            f"{source} holds data of dtype {data.dtype} and shape {data.shape}, "
            f"expected uint8 of shape (N, {_PIXELS})"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"{source} holds {labels.shape[0] if labels.ndim else labels.shape} labels "
            f"for {data.shape[0]} images"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= variant.num_classes):
        raise ValueError(
            f"{source} has labels in {labels.min()}..{labels.max()}, "
            f"expected 0..{variant.num_classes - 1}"
        )


def _read_python_batch(path: Path, variant: _Variant) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_load(path.read_bytes(), str(path))
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, expected a dict of arrays")
    key = variant.label_key
    for wanted in (b"data", key):
        if wanted not in batch:
            keys = ", ".join(repr(k) for k in batch)
            raise ValueError(
                f"{path} has no {wanted!r} entry (keys: {keys}); is it {variant.title}?"
            )
    data = batch[b"data"]
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{path}: {b'data'!r} is a {type(data).__name__}, expected an array")
    try:
        labels = np.asarray(batch[key], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {key!r} is not a list of integers ({error})") from error
    _check_arrays(data, labels, variant, str(path))
    return data, labels


def _read_binary_batch(path: Path, variant: _Variant) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = variant.label_bytes + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise ValueError(
            f"{path} has {raw.size} bytes, expected a whole number of {record}-byte records "
            f"({variant.label_bytes} label byte(s) + {_PIXELS} pixels); is it {variant.title}?"
        )
    rows = raw.reshape(-1, record)
    labels = rows[:, variant.label_bytes - 1].astype(np.int64)
    data = rows[:, variant.label_bytes :]
    _check_arrays(data, labels, variant, str(path))
    return data, labels


def load_arrays(
    num_classes: int, split: str, data_dir: str | Path | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and int64 labels of CIFAR-``num_classes`` (10 or 100)."""
    if num_classes not in _VARIANTS:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
    _check_split(split)
    variant = _VARIANTS[num_classes]
    folder, fmt = _find_folder(variant, data_dir)
    names = (variant.python_files if fmt == "python" else variant.binary_files)[split]
    reader = _read_python_batch if fmt == "python" else _read_binary_batch
    parts = [reader(folder / name, variant) for name in names]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    data = np.ascontiguousarray(data)
    if not data.flags.writeable:
        data = data.copy()
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)
