"""Files written so that readers never see half of one, and the checksum that proves a file
is the one that was written.

A leaf module: it imports nothing from gkpd, so every layer (plans, saved models, exports,
training checkpoints, benchmarks) can write through it without importing the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "atomic_write_text", "existing_dir",
           "file_sha256", "text_writer", "write_beside"]


def _umask() -> int:
    """The process's file-creation mask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting, and put back at once
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions ``path`` gets: an existing file's own, else those of a file that
    ``open()`` creates (0o666 less the umask). ``mkstemp`` makes its file 0o600, which would
    leave every saved model readable by its owner only."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def write_beside(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, sync it and give it the
    permissions that a plain ``open(path, "w")`` would (an existing file keeps its own); the
    temporary file's path, for the caller to rename into place or unlink. Removed if
    ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place
    (:func:`write_beside`). Readers see the old file or the new one, never a half-written
    one."""
    tmp = write_beside(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


def text_writer(text: str) -> Callable[[str], None]:
    """A ``write`` for :func:`atomic_write` / :func:`write_beside` that writes ``text``
    (UTF-8)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    return write


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, text_writer(text))


def atomic_write_json(path: str | Path, data: Any, **dumps: Any) -> Path:
    """``json.dumps(data, **dumps)`` plus a newline, written atomically."""
    return atomic_write_text(path, json.dumps(data, **dumps) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def existing_dir(path: Path, what: str, hint: str) -> Path:
    """``path`` if it is a directory, else an error saying whether it is missing or a file
    (``what``: how to name it; ``hint``: what to do)."""
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{what} {path} is a file, not a directory; {hint}")
    raise FileNotFoundError(f"{what} {path} does not exist; {hint}")
