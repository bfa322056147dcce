"""Runtime advice as code: the memory allocator CPU inference is fastest under.

By default glibc's malloc gives each freed block of a few MB (an activation tensor) back to
the kernel, and the next forward pass faults it in again page by page. What that costs varies
with the host: on this project's machine a ResNet-32 at batch 64 took 19-21 ms in one hour
and 26-50 ms in the next, 21.4 ms with freed memory kept, and the factored models, with more
intermediate tensors, lost more (benchmarks/RESULTS.md, "Page faults"). Two remedies:

* **glibc, in this process** (opt-in): :func:`keep_freed_memory` calls ``mallopt`` so that
  no block gets its own ``mmap`` and the heap is trimmed only past 1 GiB, for the rest of the
  process; ``gkpd bench speed`` does. The same from the environment, before the process
  starts: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`` (:data:`KEEP_FREED_ENV`).
* **another allocator**, jemalloc or TCMalloc (PyTorch's CPU performance guide recommends
  them): only before the process starts, ``LD_PRELOAD=/path/to/libjemalloc.so.2``; a running
  process cannot switch. :func:`preloaded_allocator` says whether one is in use.

:func:`describe_allocator` is the line ``gkpd summary`` and the speed bench's header print.

OpenMP's wait policy matters as much: with ``OMP_WAIT_POLICY=PASSIVE`` (which lets two jobs
share cores without spinning) the threads sleep after every parallel region, and each small
operation pays their wake-up. The speed bench on this project's machine, ResNet-32 at batch 1,
2 threads: dense 2.7-3.5 ms with the default policy, 9.7-13.2 ms with PASSIVE, and the
factored models, with more operations, lost more (benchmarks/RESULTS.md, "OpenMP's wait
policy"). :func:`describe_openmp` says which is in force.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["KEEP_FREED_ENV", "describe_allocator", "describe_openmp", "keep_freed_memory",
           "preloaded_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_TRIM_AT = 1 << 30
# what keep_freed_memory sets, as glibc reads it from the environment at start-up
KEEP_FREED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_AT)}
_ALLOCATOR = re.compile(r"lib(jemalloc|tcmalloc)[\w.+-]*\.so")
_kept_in_process = False


def preloaded_allocator(maps: str | None = None,
                        environ: Mapping[str, str] | None = None) -> str | None:
    """``"jemalloc"`` or ``"tcmalloc"`` where this process runs on one, else ``None``.

    Read from the libraries mapped into the process (``maps``: the text of
    ``/proc/self/maps``, read when not given); where that cannot be read, from
    ``LD_PRELOAD`` in ``environ`` (default ``os.environ``)."""
    if maps is None:
        maps = _read_maps()
    if maps is not None:
        names = (line.rsplit("/", 1)[-1] for line in maps.splitlines() if "/" in line)
    else:
        preload = (os.environ if environ is None else environ).get("LD_PRELOAD", "")
        names = (entry.rsplit("/", 1)[-1] for entry in re.split(r"[\s:]+", preload) if entry)
    for name in names:
        if match := _ALLOCATOR.match(name):
            return match.group(1)
    return None


def _read_maps() -> str | None:
    try:
        return Path("/proc/self/maps").read_text()
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the rest of this process: no
    block gets its own ``mmap`` (which ``free`` unmaps at once), and the heap's top is handed
    back to the OS only past 1 GiB. Returns whether it applied: not where the process runs
    on jemalloc or TCMalloc (which keep freed memory themselves) or without glibc."""
    global _kept_in_process
    if preloaded_allocator() is not None or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))
    _kept_in_process = _kept_in_process or applied
    return applied


def _set_by_environment(environ: Mapping[str, str]) -> bool:
    if environ.get("MALLOC_MMAP_MAX_") == "0":
        return True
    return "glibc.malloc.mmap_max=0" in environ.get("GLIBC_TUNABLES", "")


def describe_allocator(maps: str | None = None, environ: Mapping[str, str] | None = None,
                       libc: str | None = None) -> str:
    """One line: the allocator this process runs on and whether it keeps freed memory, with
    the remedy where it does not (``maps``, ``environ`` and ``libc`` as the process has them
    unless given: see :func:`preloaded_allocator`)."""
    environ = os.environ if environ is None else environ
    allocator = preloaded_allocator(maps, environ)
    if allocator is not None:
        return f"{allocator} (preloaded)"
    if (platform.libc_ver()[0] if libc is None else libc) != "glibc":
        return "the platform's malloc"
    if _kept_in_process:
        return "glibc malloc, freed memory kept (no mmap, trim past 1 GiB; set in this process)"
    if _set_by_environment(environ):
        return "glibc malloc, freed memory kept (set by the environment)"
    return ("glibc malloc, default settings: freed activations go back to the kernel (for "
            "speed: gkpd.runtime.keep_freed_memory(), or "
            + " ".join(f"{k}={v}" for k, v in KEEP_FREED_ENV.items()) + ")")


def describe_openmp(environ: Mapping[str, str] | None = None) -> str:
    """One line: OpenMP's wait policy as the environment sets it, with the cost of PASSIVE."""
    environ = os.environ if environ is None else environ
    policy = environ.get("OMP_WAIT_POLICY")
    if policy is None:
        return "default wait policy"
    if policy.strip().upper() == "PASSIVE":
        return ("OMP_WAIT_POLICY=PASSIVE: threads sleep between operations, small ones run "
                "up to 3x slower (unset it to time)")
    return f"OMP_WAIT_POLICY={policy}"
