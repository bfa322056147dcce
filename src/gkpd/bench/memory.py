"""Peak memory of one forward pass, measured in a fresh process (``peak_memory_mb``), and
the allocator setting the speed benchmark times under (``keep_freed_memory``)."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import queue as queue_module

import torch
from torch import nn

log = logging.getLogger(__name__)


def _status_kb(field_name: str) -> int:
    """A ``VmRSS``/``VmHWM``-style line of ``/proc/self/status``, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def _peak_memory_child(connection, shape: tuple[int, ...], dtype: torch.dtype, queue) -> None:
    # ru_maxrss is no use here: a spawned process inherits the peak of the process it was
    # forked from (the whole benchmark). VmHWM is this process's own; writing 5 to clear_refs
    # resets it to the current resident set (Linux >= 4.0).
    try:
        torch.set_num_threads(1)
        blob = connection.recv_bytes()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, dtype=dtype, generator=generator)
        # a first copy, run at batches 1 and 2 and kept, takes the code and torch's one-time
        # set-up (several MB, more on the first batch > 1); the copy measured then finds
        # little freed memory to reuse
        warm = pickle.loads(blob)
        with torch.no_grad():
            warm(x[:1].clone())
            warm(x[:2].clone())
        start = _status_kb("VmRSS")
        model = pickle.loads(blob)
        with open("/proc/self/clear_refs", "w") as f:  # the pickle's transient copies: out
            f.write("5")
        peak = _status_kb("VmHWM")
        with torch.no_grad():
            model(x)
        queue.put(("ok", max(0, _status_kb("VmHWM") - start), max(0, peak - start)))
    except BaseException as error:  # noqa: BLE001 — reported to the parent
        queue.put(("error", f"{type(error).__name__}: {error}", None))


_MALLOC_KNOB = "MALLOC_MMAP_THRESHOLD_"


def peak_memory_mb(model: nn.Module, x: torch.Tensor, timeout: float = 300) -> float | None:
    """MB a fresh process's peak resident set grows by from before ``model`` is loaded to
    the end of one forward on an input like ``x``: the weights, the input, activations,
    workspaces and anything built on the first call (e.g. a reconstructed weight). Linux only;
    ``None`` where it cannot be measured (a warning says why).

    The process is started with ``spawn``, which imports the caller's ``__main__`` again: a
    script calling this needs the ``if __name__ == "__main__":`` guard."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_peak_memory_child, daemon=True,
                            args=(receiver, tuple(x.shape), x.dtype, queue))
    # glibc: blocks of 64 kB and up are mapped and unmapped on their own, so the resident set
    # follows the live memory instead of what malloc keeps (runs agree to a few percent)
    previous = os.environ.get(_MALLOC_KNOB)
    os.environ[_MALLOC_KNOB] = "65536"
    try:
        child.start()
    finally:
        if previous is None:
            del os.environ[_MALLOC_KNOB]
        else:
            os.environ[_MALLOC_KNOB] = previous
    receiver.close()
    try:
        sender.send_bytes(pickle.dumps(model))
        status, value, _ = queue.get(timeout=timeout)
    except (OSError, queue_module.Empty) as error:
        status, value = "error", f"{type(error).__name__} {error} (exit code {child.exitcode})"
    finally:
        sender.close()
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join()
    if status != "ok":
        log.warning("peak memory: the measuring process failed: %s", value)
        return None
    return value / 1024


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_TRIM_AT = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the rest of this process: no
    block gets its own ``mmap`` (which ``free`` unmaps at once), and the heap's top is handed
    back to the OS only past 1 GiB. Returns whether it applied (glibc only).

    By default every activation tensor of a few MB is mapped fresh on each forward pass and
    faulted in page by page. What that costs depends on the kernel and the host: on this
    project's machine, a ResNet-32 at batch 64 took 19-21 ms in one hour and 26-50 ms in the
    next with the default, and 21.4 ms with this setting. The factored model, with more
    intermediate tensors, suffered more (1.38x dense against 1.63x). PyTorch's CPU
    performance guide recommends jemalloc or TCMalloc for the same reason."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_AT))

