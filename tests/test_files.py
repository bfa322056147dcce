"""gkpd.files: atomic writes leave the old file or the new one, and the checksum of the bytes."""

import hashlib
import os
import stat

import pytest

from gkpd import files
from gkpd.train import checkpoint


def test_atomic_write_replaces_the_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "sub" / "a.json"
    files.atomic_write_json(path, {"b": 1, "a": 2}, sort_keys=True)
    assert path.read_text(encoding="utf-8") == '{"a": 2, "b": 1}\n'
    files.atomic_write_text(path, "new")
    assert path.read_text(encoding="utf-8") == "new"
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fail(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        files.atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_file_sha256_is_that_of_the_bytes(tmp_path):
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # more than one 1 MiB chunk
    path.write_bytes(data)
    assert files.file_sha256(path) == hashlib.sha256(data).hexdigest()


def test_checkpoint_reexports_the_file_helpers():
    assert checkpoint.atomic_write is files.atomic_write
    assert checkpoint.atomic_write_text is files.atomic_write_text


def test_a_new_file_gets_the_umask_permissions_and_an_old_one_keeps_its_own(tmp_path):
    previous = os.umask(0o027)
    try:
        new = files.atomic_write_text(tmp_path / "new.json", "{}")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0o666 less the umask, not 0o600
        old = tmp_path / "old.json"
        old.write_text("old")
        old.chmod(0o604)
        files.atomic_write_text(old, "new")
        assert stat.S_IMODE(old.stat().st_mode) == 0o604
        assert old.read_text() == "new"
    finally:
        os.umask(previous)


def test_existing_dir_says_whether_a_path_is_missing_or_a_file(tmp_path):
    from gkpd.files import existing_dir

    assert existing_dir(tmp_path, "data_dir", "hint") == tmp_path
    with pytest.raises(FileNotFoundError, match="data_dir .*nope does not exist; hint"):
        existing_dir(tmp_path / "nope", "data_dir", "hint")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="data_dir .*file is a file, not a directory"):
        existing_dir(tmp_path / "file", "data_dir", "hint")
