"""HMDB-51 clips from tiny fake frame folders and split files."""

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from gkpd.data import build_dataset, get_info  # noqa: E402
from gkpd.data.hmdb51 import HMDB51Dataset, read_split_file, sample_indices  # noqa: E402
from gkpd.data.transforms import Compose, Normalize, RandomHorizontalFlip  # noqa: E402

CLASSES = ("brush_hair", "jump")


def make_hmdb(root, frames=5, with_avi_suffix=False):
    """Two classes, three videos each: train, test, unused; frame i has brightness 10*i."""
    (root / "splits").mkdir(parents=True)
    for name in CLASSES:
        for fold in (1, 2):
            ids = (1, 2, 0) if fold == 1 else (2, 1, 0)
            lines = "".join(f"{name}_v{v}.avi {ids[v]} \n" for v in range(3))
            (root / "splits" / f"{name}_test_split{fold}.txt").write_text(lines)
        for v in range(3):
            folder = root / "frames" / name / (f"{name}_v{v}" + (".avi" if with_avi_suffix else ""))
            folder.mkdir(parents=True)
            for i in range(1, frames + 1):  # unpadded names: 1.jpg .. 10.jpg sort naturally
                Image.new("RGB", (24, 18), (10 * i, 10 * i, 10 * i)).save(folder / f"{i}.png")


def test_test_clips_uniform_frames_shape(tmp_path):
    make_hmdb(tmp_path, frames=10)
    dataset = HMDB51Dataset(tmp_path, "test", num_frames=4, image_size=8)
    assert dataset.classes == list(CLASSES) and len(dataset) == 2
    clip, label = dataset[1]
    assert clip.shape == (3, 4, 8, 8) and clip.dtype == torch.float32 and label == 1
    # 10 frames, 4 segments, centres -> frames 1, 3, 6, 8 (0-based) -> files 2, 4, 7, 9
    brightness = (clip[0, :, 4, 4] * 255).round().tolist()
    assert brightness == [20.0, 40.0, 70.0, 90.0]


def test_train_clips_random_offset_and_fold(tmp_path):
    make_hmdb(tmp_path, frames=10, with_avi_suffix=True)
    fold1 = HMDB51Dataset(tmp_path, "train", num_frames=3, image_size=8)
    fold2 = HMDB51Dataset(tmp_path, "train", fold=2, num_frames=3, image_size=8)
    assert [c[0][0].parent.name for c in fold1.clips] == ["brush_hair_v0.avi", "jump_v0.avi"]
    assert [c[0][0].parent.name for c in fold2.clips] == ["brush_hair_v1.avi", "jump_v1.avi"]
    torch.manual_seed(0)
    starts = {round(float(fold1[0][0][0, 0, 4, 4]) * 255) for _ in range(12)}
    assert len(starts) > 1 and starts <= {10, 20, 30, 40}


def test_sample_indices():
    assert sample_indices(10, 4, random_offset=False) == [1, 3, 6, 8]
    assert sample_indices(2, 4, random_offset=False) == [0, 0, 1, 1]  # short videos repeat
    for _ in range(10):
        indices = sample_indices(7, 3, random_offset=True)
        assert indices == sorted(indices) and 0 <= indices[0] and indices[-1] <= 6


def test_transform_sees_frames_stacked_and_one_flip_per_clip(tmp_path):
    make_hmdb(tmp_path, frames=3)
    seen = []

    def record(x):
        seen.append(tuple(x.shape))
        return x

    transform = Compose(record, RandomHorizontalFlip(), Normalize((0.5,) * 3, (0.5,) * 3))
    clip, _ = HMDB51Dataset(tmp_path, "test", transform, num_frames=2, image_size=6)[0]
    assert seen == [(2, 3, 6, 6)] and clip.shape == (3, 2, 6, 6)
    assert clip.min() >= -1 and clip.max() <= 1


def test_registry_build(tmp_path):
    make_hmdb(tmp_path, frames=2)
    info = get_info("hmdb51")
    assert info.num_classes == 51 and info.in_channels == 3
    clip, label = build_dataset("hmdb51", "test", tmp_path)[0]
    assert clip.shape == (3, 16, info.image_size, info.image_size) and label == 0


def test_missing_frames_error_and_skip(tmp_path):
    make_hmdb(tmp_path)
    for frame in (tmp_path / "frames" / "jump" / "jump_v1").iterdir():
        frame.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 test video.*jump/jump_v1.*DIR/frames/<class>"):
        HMDB51Dataset(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="allow_missing"):
        HMDB51Dataset(tmp_path, "test")
    assert len(HMDB51Dataset(tmp_path, "test", allow_missing=True)) == 1


def test_missing_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*DIR/frames/<class>/<video>"):
        HMDB51Dataset(tmp_path / "nowhere")
    (tmp_path / "frames").mkdir()
    with pytest.raises(FileNotFoundError, match=r"splits does not exist.*_test_split<k>\.txt"):
        HMDB51Dataset(tmp_path)
    (tmp_path / "splits").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*_test_split3\.txt files"):
        HMDB51Dataset(tmp_path, fold=3)
    with pytest.raises(ValueError, match="pass data_dir"):
        build_dataset("hmdb51", "train", None)


def test_malformed_split_file(tmp_path):
    make_hmdb(tmp_path)
    (tmp_path / "splits" / "jump_test_split1.txt").write_text("jump_v0.avi 1\njump_v1.avi 7\n")
    with pytest.raises(ValueError, match=r"jump_test_split1\.txt:2: 'jump_v1\.avi 7'"):
        HMDB51Dataset(tmp_path)


def test_bad_arguments(tmp_path):
    make_hmdb(tmp_path)
    with pytest.raises(ValueError, match="fold must be"):
        HMDB51Dataset(tmp_path, fold=4)
    with pytest.raises(ValueError, match="split"):
        HMDB51Dataset(tmp_path, "val")
    with pytest.raises(ValueError, match="num_frames"):
        HMDB51Dataset(tmp_path, num_frames=0)


def test_frames_sorted_naturally(tmp_path):
    make_hmdb(tmp_path, frames=12)
    frames = HMDB51Dataset(tmp_path, "test").clips[0][0]
    assert [p.stem for p in frames] == [str(i) for i in range(1, 13)]
    assert np.all(np.diff([int(p.stem) for p in frames]) == 1)


def test_a_split_file_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "brush_hair_test_split1.txt"
    path.write_bytes(b"\xff\xfe\x00clip.avi 1\n")
    with pytest.raises(ValueError, match="brush_hair_test_split1.txt is not a text split file"):
        read_split_file(path)


def test_clips_are_four_dimensional_items_and_a_2d_model_is_refused(tmp_path, capsys):
    from testkit.cli import run

    assert get_info("hmdb51").input_size == [3, 16, 224, 224]
    assert get_info("cifar10").input_size == [3, 32, 32]
    make_hmdb(tmp_path / "data", frames=4)
    code, _, err = run(capsys, "train", "resnet20", "--data", "hmdb51", "--data-dir",
                       tmp_path / "data", "--epochs", "1", "--out", tmp_path / "out",
                       "--no-progress")
    assert code == 2 and "resnet20 takes 2-d inputs, but --data hmdb51 has 3-d items (clips" in err
    assert not (tmp_path / "out").exists()


def test_a_class_without_its_split_file_is_refused_not_relabelled(tmp_path):
    make_hmdb(tmp_path, frames=4)
    (tmp_path / "splits" / "brush_hair_test_split1.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 class folder\(s\) .* \(e.g. brush_hair\)"):
        HMDB51Dataset(tmp_path, "test", num_frames=2, image_size=8)
    HMDB51Dataset(tmp_path, "test", fold=2, num_frames=2, image_size=8)  # fold 2 has both
