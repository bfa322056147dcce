"""Peak memory of one forward pass, measured in a fresh process (``peak_memory_mb``). The
allocator setting the speed benchmark times under, ``keep_freed_memory``, is
:mod:`gkpd.runtime`'s (importable from here as before)."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import threading

import torch
from torch import nn

from gkpd.runtime import keep_freed_memory

__all__ = ["keep_freed_memory", "peak_memory_mb"]

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
    # Ctrl-C reaches the whole process group: the child, started with SIGINT ignored, keeps
    # it ignored (Python installs its handler only where the signal is not ignored), so the
    # parent alone reports the interruption instead of both printing a traceback
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        child.start()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, handler)
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
