"""HMDB-51 action recognition from extracted frames and the official train/test splits.

Expected layout of ``data_dir``::

    DIR/frames/<class>/<video>/<frame>.jpg   frames of one video, in file-name order
                                             (<video> is the .avi name with or without ".avi")
    DIR/splits/<class>_test_split<k>.txt     the official split files, k = 1, 2, 3; each line
                                             is "<video>.avi <id>", id 1 = train, 2 = test,
                                             0 = unused

The videos and split files come from https://serre-lab.clps.brown.edu/resource/hmdb-a-large-
human-motion-database/ (hmdb51_org.rar, test_train_splits.rar); extract frames with e.g.
``ffmpeg -i VIDEO.avi DIR/frames/CLASS/VIDEO/%05d.jpg``.

Each item is ``(clip, label)`` with ``clip`` a float tensor (3, T, H, W) for 3-D convolutions:
``num_frames`` frames sampled uniformly over the whole video (evenly spaced, at the centre of
each of T equal segments for the test split, at one random offset within the segments for the
train split; short videos repeat frames). Every frame of a clip gets the same spatial crop:
central 87.5% of the shorter side for test, one random resized crop for train.

``transform`` (written for a (C, H, W) image) is called once per clip on the (T, C, H, W)
stack of frames, so the tensor transforms of :mod:`gkpd.data.transforms` broadcast over time
and draw one random crop and flip for the whole clip; the result is permuted to (C, T, H, W).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gkpd.data.image_folder import (
    EXTENSIONS,
    center_box,
    decode,
    random_resized_box,
    require_pillow,
)
from gkpd.files import existing_dir

log = logging.getLogger(__name__)

URL = "https://serre-lab.clps.brown.edu/resource/hmdb-a-large-human-motion-database/"
LAYOUT = (
    "expected DIR/frames/<class>/<video>/*.jpg (frames extracted from the videos, e.g. "
    "`ffmpeg -i VIDEO.avi DIR/frames/CLASS/VIDEO/%05d.jpg`) and the official split files "
    f"DIR/splits/<class>_test_split<k>.txt (lines '<video>.avi 1|2|0'); both from {URL}"
)
_SPLIT_IDS = {"train": 1, "test": 2}


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_split_file(path: Path) -> list[tuple[str, int]]:
    """``(video, id)`` pairs of one official split file; ``video`` without ".avi"."""
    entries = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a text split file ({error}); {LAYOUT}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(
                f"{path}:{number}: {line.strip()!r} is not '<video>.avi <0|1|2>'; {LAYOUT}"
            )
        name = fields[0][:-4] if fields[0].endswith(".avi") else fields[0]
        entries.append((name, int(fields[1])))
    return entries


def sample_indices(num_available: int, num_frames: int, random_offset: bool) -> list[int]:
    """``num_frames`` frame indices spread evenly over ``num_available`` frames."""
    offset = float(torch.rand(())) if random_offset else 0.5
    step = num_available / num_frames
    return [min(int((i + offset) * step), num_available - 1) for i in range(num_frames)]


class HMDB51Dataset(Dataset):
    """Clips of HMDB-51 for one official ``fold`` (1, 2 or 3) and ``split`` (train/test)."""

    def __init__(
        self,
        root: str | Path | None,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        fold: int = 1,
        num_frames: int = 16,
        image_size: int = 224,
        random_sampling: bool | None = None,
        allow_missing: bool = False,
    ) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if fold not in (1, 2, 3):
            raise ValueError(f"fold must be the official split number 1, 2 or 3, got {fold!r}")
        for name, value in (("num_frames", num_frames), ("image_size", image_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if root is None:
            raise ValueError(f"hmdb51 has no default location; pass data_dir; {LAYOUT}")
        root = existing_dir(Path(root), "hmdb51 data_dir", LAYOUT)
        require_pillow()
        frames_dir, splits_dir = root / "frames", root / "splits"
        for folder in (frames_dir, splits_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} does not exist; {LAYOUT}")
        suffix = f"_test_split{fold}.txt"
        split_files = sorted(p for p in splits_dir.iterdir() if p.name.endswith(suffix))
        if not split_files:
            raise FileNotFoundError(f"no *{suffix} files in {splits_dir}; {LAYOUT}")
        self.classes = [p.name[: -len(suffix)] for p in split_files]
        # labels are the split files' order: a class without one shifts every later label
        unsplit = sorted({p.name for p in frames_dir.iterdir()
                          if p.is_dir() and not p.name.startswith(".")} - set(self.classes))
        if unsplit:
            raise FileNotFoundError(
                f"{len(unsplit)} class folder(s) under {frames_dir} have no *{suffix} file in "
                f"{splits_dir} (e.g. {', '.join(unsplit[:3])}): the labels of the classes "
                f"after them would shift; {LAYOUT}"
            )

        wanted = _SPLIT_IDS[split]
        clips: list[tuple[list[Path], int]] = []
        missing: list[str] = []
        for label, (name, split_file) in enumerate(zip(self.classes, split_files, strict=True)):
            for video, split_id in read_split_file(split_file):
                if split_id != wanted:
                    continue
                frames = self._frames(frames_dir / name, video)
                if frames:
                    clips.append((frames, label))
                else:
                    missing.append(f"{name}/{video}")
        if missing:
            message = (
                f"{len(missing)} {split} video(s) of fold {fold} have no frames under "
                f"{frames_dir} (e.g. {', '.join(missing[:3])})"
            )
            if not allow_missing:
                raise FileNotFoundError(
                    f"{message}; pass allow_missing=True to skip them; {LAYOUT}"
                )
            log.warning("%s; skipping them", message)
        if not clips:
            raise ValueError(f"no {split} videos for fold {fold} under {root}; {LAYOUT}")
        self.root = root
        self.clips = clips
        self.transform = transform
        self.num_frames = num_frames
        self.image_size = image_size
        self.random_sampling = split == "train" if random_sampling is None else random_sampling

    @staticmethod
    def _frames(class_dir: Path, video: str) -> list[Path]:
        for folder in (class_dir / video, class_dir / f"{video}.avi"):
            if folder.is_dir():
                frames = [
                    p for p in folder.iterdir()
                    if p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
                ]
                return sorted(frames, key=_natural_key)
        return []

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        frames, label = self.clips[index]
        chosen = sample_indices(len(frames), self.num_frames, self.random_sampling)
        box = None

        def box_for(width: int, height: int):
            nonlocal box
            if box is None:  # one crop for the whole clip, from the first frame's size
                box = (random_resized_box if self.random_sampling else center_box)(width, height)
            return box

        clip = torch.stack([decode(frames[i], self.image_size, box_for) for i in chosen])
        clip = clip.float().div_(255.0)  # (T, C, H, W)
        if self.transform is not None:
            clip = self.transform(clip)
        return clip.permute(1, 0, 2, 3).contiguous(), label
