"""Image folders (ImageNet layout) decoded with Pillow from tiny fake images."""

import builtins

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from gkpd.data import build_dataset, get_info  # noqa: E402
from gkpd.data.image_folder import ImageFolderDataset, random_resized_box  # noqa: E402


def make_image(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_tree(root, classes=("cat", "dog"), per_class=2, splits=("train", "val")):
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}
    for split in splits:
        for name in classes:
            for i in range(per_class):
                make_image(root / split / name / f"{i}.png", colors[name])


def test_eval_items_are_center_cropped_and_labelled(tmp_path):
    make_tree(tmp_path)
    dataset = ImageFolderDataset(tmp_path, "test", image_size=16)
    assert dataset.classes == ["cat", "dog"] and len(dataset) == 4
    image, label = dataset[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 0
    torch.testing.assert_close(image[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))
    assert dataset[3][1] == 1
    torch.testing.assert_close(image, dataset[0][0])  # deterministic


def test_center_crop_takes_the_middle(tmp_path):
    # left half black, right half white: the central crop shows both halves
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, 30:] = 255
    (tmp_path / "val" / "a").mkdir(parents=True)
    Image.fromarray(array).save(tmp_path / "val" / "a" / "x.png")
    image, _ = ImageFolderDataset(tmp_path, "test", image_size=8)[0]
    assert image[0, 4, 0] < 0.1 and image[0, 4, -1] > 0.9


def test_train_crops_are_random_and_sized(tmp_path):
    make_tree(tmp_path, splits=("train",))
    array = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "train" / "cat" / "0.png")
    dataset = ImageFolderDataset(tmp_path, "train", image_size=12)
    torch.manual_seed(0)
    first, second = dataset[0][0], dataset[0][0]
    assert first.shape == (3, 12, 12) and not torch.equal(first, second)
    for _ in range(20):
        left, top, right, bottom = random_resized_box(70, 50)
        assert 0 <= left < right <= 70 and 0 <= top < bottom <= 50


def test_registry_build(tmp_path):
    make_tree(tmp_path, classes=("cat", "dog", "eel"))
    info = get_info("imagefolder")
    assert info.image_size == 224 and info.in_channels == 3
    image, label = build_dataset("imagefolder", "train", tmp_path)[5]
    assert image.shape == (3, 224, 224) and label == 2
    assert len(build_dataset("imagefolder", "test", tmp_path)) == 6


def test_test_split_falls_back_to_test_folder(tmp_path):
    make_tree(tmp_path, splits=("train", "test"))
    assert len(ImageFolderDataset(tmp_path, "test", image_size=8)) == 4


def test_val_labels_follow_train_classes(tmp_path):
    make_tree(tmp_path, classes=("cat", "dog"), splits=("train",))
    make_tree(tmp_path, classes=("dog",), splits=("val",))
    dataset = ImageFolderDataset(tmp_path, "test", image_size=8)
    assert dataset.classes == ["cat", "dog"] and {label for _, label in dataset.samples} == {1}
    make_tree(tmp_path, classes=("eel",), splits=("val",))
    with pytest.raises(ValueError, match="eel has no counterpart"):
        ImageFolderDataset(tmp_path, "test", image_size=8)


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no images.*DIR/train/<class>"):
        ImageFolderDataset(tmp_path, "train")


def test_no_class_folders(tmp_path):
    make_image(tmp_path / "train" / "loose.png", (1, 2, 3))
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path, "train")


def test_missing_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*ImageNet layout"):
        ImageFolderDataset(tmp_path / "nowhere", "train")
    make_tree(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match="val or .*test does not exist"):
        ImageFolderDataset(tmp_path, "test")
    with pytest.raises(ValueError, match="pass data_dir"):
        build_dataset("imagefolder", "train", None)


def test_corrupt_image_names_path(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "val" / "cat" / "0.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path, "test")
    with pytest.raises(ValueError, match=r"cannot decode image .*0\.png"):
        dataset[0]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        ImageFolderDataset(tmp_path, "val")
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(tmp_path, "train", image_size=0)


def test_missing_pillow_says_how_to_install(tmp_path, monkeypatch):
    make_tree(tmp_path)
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(ImportError, match=r"pip install gkpd\[images\]"):
        ImageFolderDataset(tmp_path, "train")
