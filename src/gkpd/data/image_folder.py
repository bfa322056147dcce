"""Image folders in the ImageNet layout, decoded with Pillow (``pip install gkpd[images]``).

Expected layout (class names are folder names, sorted to give the labels)::

    DIR/train/<class>/*.jpg     (any of .jpg .jpeg .png .bmp .ppm .tif .tiff .webp)
    DIR/val/<class>/*.jpg       (the "test" split; DIR/test/ is used when there is no val/)

Each image is decoded to RGB and cropped to ``image_size`` square on the fly: the ``train``
split takes a random resized crop (random area 8%-100%, aspect ratio 3/4-4/3), the ``test``
split the central 87.5% of the shorter side (the classic "resize to 256, center-crop 224").
The crop is part of decoding because it works on the full-size picture; flips and
normalization come from ``transform``, which receives a float (3, image_size, image_size)
tensor in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp"})
EVAL_CROP_FRACTION = 0.875
LAYOUT = (
    "expected DIR/train/<class>/<image> and DIR/val/<class>/<image> (the ImageNet layout; "
    f"images: {', '.join(sorted(EXTENSIONS))})"
)
Box = tuple[float, float, float, float]


def require_pillow():
    """The ``PIL.Image`` module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "decoding image files needs Pillow: install it with `pip install gkpd[images]` "
            "(or `pip install pillow`)"
        ) from error
    return Image


def center_box(width: int, height: int, fraction: float = EVAL_CROP_FRACTION) -> Box:
    """The central square whose side is ``fraction`` of the shorter side."""
    side = min(width, height) * fraction
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A random box covering ``scale`` of the area with aspect ratio in ``ratio``."""
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_low + (log_high - log_low) * u[1])
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = (width - w) * u[2], (height - h) * u[3]
            return (left, top, left + w, top + h)
    # Rarely no sample fits (very elongated images): fall back to the central square.
    return center_box(width, height, 1.0)


def decode(path: Path, size: int, box_for: Callable[[int, int], Box]) -> torch.Tensor:
    """uint8 (3, size, size) RGB image: the region ``box_for(width, height)`` of ``path``."""
    image_module = require_pillow()
    try:
        with image_module.open(path) as image:
            rgb = image.convert("RGB")
            box = box_for(*rgb.size)
            resized = rgb.resize((size, size), image_module.Resampling.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
    array = np.asarray(resized, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _split_folder(root: Path, split: str) -> Path:
    names = ("train",) if split == "train" else ("val", "test")
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(str(root / name) for name in names)
    raise FileNotFoundError(f"no {split} folder: {wanted} does not exist; {LAYOUT}")


class ImageFolderDataset(Dataset):
    """Labelled images from ``root/<split folder>/<class>/``; items are ``(image, label)``.

    Class names come from ``root/train`` when it exists (so both splits share labels) and
    otherwise from the split's own folder; ``classes[label]`` is the name of a label.
    """

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        image_size: int = 224,
        random_crop: bool | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if root is None:
            raise ValueError(f"imagefolder has no default location; pass data_dir; {LAYOUT}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"imagefolder data_dir {root} does not exist; {LAYOUT}")
        require_pillow()  # fail now rather than in the first batch
        folder = _split_folder(root, split)
        class_source = root / "train" if (root / "train").is_dir() else folder
        self.classes = [p.name for p in _visible_dirs(class_source)]
        if not self.classes:
            raise ValueError(f"{class_source} has no class folders; {LAYOUT}")
        index = {name: i for i, name in enumerate(self.classes)}
        samples: list[tuple[Path, int]] = []
        for class_dir in _visible_dirs(folder):
            if class_dir.name not in index:
                raise ValueError(
                    f"class folder {class_dir} has no counterpart in {class_source}; "
                    "both splits must use the same class names"
                )
            images = _images_in(class_dir)
            if not images:
                raise ValueError(f"class folder {class_dir} holds no images; {LAYOUT}")
            samples.extend((path, index[class_dir.name]) for path in images)
        if not samples:
            raise ValueError(f"{folder} holds no class folders with images; {LAYOUT}")
        self.root = root
        self.samples = samples
        self.transform = transform
        self.image_size = image_size
        self.random_crop = split == "train" if random_crop is None else random_crop

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        box_for = random_resized_box if self.random_crop else center_box
        image = decode(path, self.image_size, box_for).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
