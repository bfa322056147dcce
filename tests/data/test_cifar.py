"""CIFAR-10/100 from tiny fake python-pickle and binary batches; the unpickler is restricted."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from gkpd.data import build_dataset, cifar, get_info


class Py2StylePickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` opcodes, as the original CIFAR pickles are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_py2_text(self, obj):
        self.save_py2_str(obj.encode("latin1"))

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_text  # numpy's dtype state ("u1", "|") too, as Python 2 wrote it


def py2_pickle(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    # numpy 1.x on Python 2 named the module numpy.core.multiarray
    return buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def fake_batch(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, num_classes, n)


def write_cifar10_python(folder, protocol="py2", n=3):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data, labels = fake_batch(n, 10, i)
        batch = {b"batch_label": b"fake", b"labels": [int(x) for x in labels], b"data": data,
                 b"filenames": [b"a.png"] * n}
        raw = py2_pickle(batch) if protocol == "py2" else pickle.dumps(batch, protocol=protocol)
        (folder / name).write_bytes(raw)
        batches[name] = (data, labels)
    return batches


def write_cifar100_python(folder, n=4):
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for i, name in enumerate(["train", "test"]):
        data, fine = fake_batch(n, 100, i)
        batch = {b"data": data, b"fine_labels": [int(x) for x in fine],
                 b"coarse_labels": [int(x) % 20 for x in fine]}
        (folder / name).write_bytes(py2_pickle(batch))
        batches[name] = (data, fine)
    return batches


def test_cifar10_python_from_parent_and_folder(tmp_path):
    batches = write_cifar10_python(tmp_path / "cifar-10-batches-py")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        images, labels = cifar.load_arrays(10, "train", data_dir)
        assert images.shape == (15, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and labels.shape == (15,)
        np.testing.assert_array_equal(images[:3].reshape(3, -1).numpy(), batches["data_batch_1"][0])
        np.testing.assert_array_equal(labels[12:].numpy(), batches["data_batch_5"][1])
    images, labels = cifar.load_arrays(10, "test", tmp_path)
    np.testing.assert_array_equal(labels.numpy(), batches["test_batch"][1])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python3_pickles(tmp_path, protocol):
    batches = write_cifar10_python(tmp_path, protocol=protocol)
    images, _ = cifar.load_arrays(10, "test", tmp_path)
    np.testing.assert_array_equal(images.reshape(3, -1).numpy(), batches["test_batch"][0])


def test_cifar100_python_fine_labels(tmp_path):
    batches = write_cifar100_python(tmp_path / "cifar-100-python")
    images, labels = cifar.load_arrays(100, "train", tmp_path)
    assert images.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(labels.numpy(), batches["train"][1])


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = {}
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        data, labels = fake_batch(2, 10, i)
        rows = np.concatenate([labels[:, None].astype(np.uint8), data], axis=1)
        (folder / name).write_bytes(rows.tobytes())
        expected[name] = (data, labels)
    images, labels = cifar.load_arrays(10, "test", tmp_path)
    np.testing.assert_array_equal(images.reshape(2, -1).numpy(), expected["test_batch.bin"][0])
    np.testing.assert_array_equal(labels.numpy(), expected["test_batch.bin"][1])
    assert cifar.load_arrays(10, "train", folder)[0].shape == (10, 3, 32, 32)


def test_cifar100_binary_uses_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    data, fine = fake_batch(3, 100, 0)
    coarse = fine % 20
    rows = np.concatenate([coarse[:, None], fine[:, None], data], axis=1).astype(np.uint8)
    for name in ("train.bin", "test.bin"):
        (folder / name).write_bytes(rows.tobytes())
    _, labels = cifar.load_arrays(100, "train", tmp_path)
    np.testing.assert_array_equal(labels.numpy(), fine)


def test_registry_items_are_normalized_and_augmented(tmp_path):
    write_cifar10_python(tmp_path)
    info = get_info("cifar10")
    assert (info.image_size, info.crop_padding, info.in_channels) == (32, 4, 3)
    image, label = build_dataset("cifar10", "train", tmp_path)[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 10
    write_cifar100_python(tmp_path / "c100")
    assert build_dataset("cifar100", "test", tmp_path / "c100")[3][0].shape == (3, 32, 32)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_foreign_global_is_refused_not_run(tmp_path):
    write_cifar10_python(tmp_path)
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(marker)}, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch.*refusing to load global .*system"):
        cifar.load_arrays(10, "test", tmp_path)
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
    import codecs

    class Sneaky:
        def __reduce__(self):
            return (codecs.encode, ("x", "rot13"))

    with pytest.raises(ValueError, match="refusing _codecs.encode"):
        cifar.restricted_load(pickle.dumps(Sneaky(), protocol=2), "sneaky")


def test_missing_dir_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*cs\.toronto\.edu/~kriz/cifar"):
        cifar.load_arrays(10, "train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="pass data_dir"):
        cifar.load_arrays(100, "train", None)


def test_empty_dir_lists_expected_files(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"extract it first.*data_batch_1.*test_batch"):
        cifar.load_arrays(10, "train", tmp_path)


def test_missing_batch_named(tmp_path):
    write_cifar10_python(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3"):
        cifar.load_arrays(10, "train", tmp_path)


def test_wrong_shape_and_labels(tmp_path):
    write_cifar10_python(tmp_path)
    bad = {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(py2_pickle(bad))
    with pytest.raises(ValueError, match=r"shape \(2, 1024\).*expected uint8 of shape \(N, 3072\)"):
        cifar.load_arrays(10, "test", tmp_path)
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
    (tmp_path / "test_batch").write_bytes(py2_pickle(bad))
    with pytest.raises(ValueError, match=r"labels in 0\.\.10, expected 0\.\.9"):
        cifar.load_arrays(10, "test", tmp_path)
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(py2_pickle(bad))
    with pytest.raises(ValueError, match=r"no b'labels' entry.*CIFAR-10"):
        cifar.load_arrays(10, "test", tmp_path)


def test_garbage_and_truncated_files(tmp_path):
    write_cifar10_python(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="test_batch is not a CIFAR python batch"):
        cifar.load_arrays(10, "test", tmp_path)
    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        (binary / name).write_bytes(b"\0" * 3000)
    with pytest.raises(ValueError, match="3000 bytes.*3073-byte records"):
        cifar.load_arrays(10, "test", tmp_path / "bin")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        cifar.load_arrays(10, "val", tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        cifar.load_arrays(20, "train", tmp_path)
