"""Fashion-MNIST IDX loading from tiny fake files."""

import gzip
import struct

import numpy as np
import pytest
import torch

from gkpd.data import build_dataset, fashion_mnist


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(directory, prefix, images, labels, gz):
    files = ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels))
    for stem, array in files:
        raw = idx_bytes(array)
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)


def fake_dir(tmp_path, gz=True, n_train=6, n_test=4, size=28):
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_split(tmp_path, prefix, images, labels, gz)
        data[prefix] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_loads_gz_and_raw(tmp_path, gz):
    data = fake_dir(tmp_path, gz=gz)
    images, labels = fashion_mnist.load_arrays("train", tmp_path)
    assert images.shape == (6, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(images[:, 0].numpy(), data["train"][0])
    np.testing.assert_array_equal(labels.numpy(), data["train"][1])
    test_images, _ = fashion_mnist.load_arrays("test", tmp_path)
    assert test_images.shape == (4, 1, 28, 28)


def test_registry_builds_normalized_items(tmp_path):
    fake_dir(tmp_path)
    dataset = build_dataset("fashion-mnist", "test", tmp_path)
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert isinstance(label, int) and len(dataset) == 4


def test_wrong_magic(tmp_path):
    fake_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[2] = 0x0D  # float type code
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="bad magic"):
        fashion_mnist.load_arrays("train", tmp_path)


def test_truncated_file(tmp_path):
    fake_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.load_arrays("train", tmp_path)


def test_truncated_gzip(tmp_path):
    fake_dir(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="cannot read"):
        fashion_mnist.load_arrays("train", tmp_path)


def test_corrupt_gzip_data(tmp_path):
    """Flipped bytes inside the compressed stream: zlib's own error, named with the file."""
    fake_dir(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    for i in range(20, len(data) - 20):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot read .*train-images-idx3-ubyte.gz"):
        fashion_mnist.load_arrays("train", tmp_path)


def test_wrong_image_shape(tmp_path):
    fake_dir(tmp_path, size=32)
    with pytest.raises(ValueError, match=r"expected \(28, 28\)"):
        fashion_mnist.load_arrays("train", tmp_path)


def test_label_count_mismatch(tmp_path):
    fake_dir(tmp_path)
    write_split(tmp_path, "train", np.zeros((6, 28, 28), np.uint8), np.zeros(5, np.uint8), True)
    with pytest.raises(ValueError, match="5,.*labels for 6 images"):
        fashion_mnist.load_arrays("train", tmp_path)


def test_missing_dir_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_arrays("train", tmp_path / "nowhere")


def test_missing_file(tmp_path):
    fake_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*apt-get install"):
        fashion_mnist.load_arrays("test", tmp_path)


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load_arrays("validation", tmp_path)
