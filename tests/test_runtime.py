"""gkpd.runtime: which allocator the process runs on, and the advice that follows."""

from __future__ import annotations

import pytest

from gkpd import runtime

_GLIBC_ONLY = """\
7f1c2a000000-7f1c2a022000 r--p 00000000 fe:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6
7f1c2b000000-7f1c2b001000 rw-p 00000000 00:00 0
7ffd5e6f1000-7ffd5e712000 rw-p 00000000 00:00 0                          [stack]
"""


def _maps_with(library: str) -> str:
    return _GLIBC_ONLY + f"7f1c2c000000-7f1c2c0a0000 r-xp 00000000 fe:01 99 {library}\n"


@pytest.mark.parametrize("library, expected", [
    ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "jemalloc"),
    ("/opt/conda/lib/libtcmalloc_minimal.so.4.5.9", "tcmalloc"),
    ("/usr/lib/libtcmalloc.so", "tcmalloc"),
    ("/home/me/notlibjemalloc.so", None),  # a name that only contains it
    ("/usr/lib/x86_64-linux-gnu/libm.so.6", None),
])
def test_the_allocator_is_read_from_the_mapped_libraries(library, expected):
    # LD_PRELOAD says nothing while the maps can be read: the library may have failed to load
    environ = {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    assert runtime.preloaded_allocator(_maps_with(library), environ) == expected


def test_without_the_maps_ld_preload_names_the_allocator(monkeypatch):
    monkeypatch.setattr(runtime, "_read_maps", lambda: None)
    preload = {"LD_PRELOAD": "/lib/libfoo.so /opt/lib/libtcmalloc_minimal.so.4:/x/libbar.so"}
    assert runtime.preloaded_allocator(environ=preload) == "tcmalloc"
    assert runtime.preloaded_allocator(environ={"LD_PRELOAD": "/lib/libfoo.so"}) is None
    assert runtime.preloaded_allocator(environ={}) is None


def test_describe_allocator(monkeypatch):
    monkeypatch.setattr(runtime, "_kept_in_process", False)
    jemalloc = _maps_with("/usr/lib/libjemalloc.so.2")
    assert runtime.describe_allocator(jemalloc, {}, "glibc") == "jemalloc (preloaded)"
    assert runtime.describe_allocator(_GLIBC_ONLY, {}, "musl") == "the platform's malloc"
    default = runtime.describe_allocator(_GLIBC_ONLY, {}, "glibc")
    assert default.startswith("glibc malloc, default settings")
    assert "keep_freed_memory()" in default and "MALLOC_MMAP_MAX_=0" in default
    for environ in ({"MALLOC_MMAP_MAX_": "0"},
                    {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=9"}):
        assert runtime.describe_allocator(_GLIBC_ONLY, environ, "glibc") == (
            "glibc malloc, freed memory kept (set by the environment)")
    monkeypatch.setattr(runtime, "_kept_in_process", True)
    assert "set in this process" in runtime.describe_allocator(_GLIBC_ONLY, {}, "glibc")


def test_describe_openmp():
    assert runtime.describe_openmp({}) == "default wait policy"
    for passive in ("PASSIVE", "passive "):
        line = runtime.describe_openmp({"OMP_WAIT_POLICY": passive})
        assert line.startswith("OMP_WAIT_POLICY=PASSIVE") and "3x slower" in line
    assert runtime.describe_openmp({"OMP_WAIT_POLICY": "ACTIVE"}) == "OMP_WAIT_POLICY=ACTIVE"


def test_keep_freed_memory_leaves_a_preloaded_allocator_alone(monkeypatch):
    monkeypatch.setattr(runtime, "_kept_in_process", False)
    monkeypatch.setattr(runtime, "preloaded_allocator", lambda: "jemalloc")
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: pytest.fail("mallopt called"))
    assert runtime.keep_freed_memory() is False
    assert runtime._kept_in_process is False
