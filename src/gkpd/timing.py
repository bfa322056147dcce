"""Timing on this machine: interleaved rounds of several calls, the forward latency of a
model, the CPU's name, the on-disk cache of per-layer timings, and how busy other processes
kept the cores meanwhile.

Interleaving (one call of each option per round, medians over rounds) makes a change of the
machine's load hit every option alike; :mod:`gkpd.plan.latency_objective` plans with it and
the speed benchmark times with it. A leaf module but for :mod:`gkpd.files` (atomic writes)
and :mod:`gkpd.inputs` (how the model is called).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkpd.files import atomic_write_text
from gkpd.inputs import ModelCall, eval_mode

__all__ = [
    "CACHE_ENV",
    "CpuContention",
    "LatencyCache",
    "cpu_model",
    "default_cache_path",
    "environment_key",
    "free_cores",
    "measure_latency",
    "time_interleaved",
]

log = logging.getLogger(__name__)

CACHE_ENV = "GKPD_CACHE_DIR"
# 2: Kronecker convs no longer dilate a stage along its kernel's size-1 axes, which made them
# run torch's slow dilated kernel: timings of version 1 are stale
# 3: at inference Kronecker convs replay their recorded forward (5-10 µs less a call)
# 4: each axis is padded in the stage whose kernel spans it (up to 1.35x faster stages)
_CACHE_VERSION = 4
_ROUNDS = 7
_WARMUP = 2
_MAX_ROUNDS = 200


# the cores that other processes may keep busy on average while a measurement still counts
# as taken on a quiet machine (the kernel and daemons of an idle host use a few hundredths)
BUSY_CORES = 0.25
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # /proc/stat's user, nice, system, irq, softirq, steal


class CpuContention:
    """How many cores other processes (and the hypervisor, as steal time) kept busy while
    this one ran: the host's busy CPU time since :meth:`start` (``/proc/stat``) less this
    process's own, over the wall time. A measurement is taken on a busy machine when that is
    at least :data:`BUSY_CORES`. Child processes (DataLoader workers) count as others.
    ``None`` where ``/proc/stat`` cannot be read (not Linux)."""

    def __init__(self, stat_path: str | Path = "/proc/stat", *,
                 wall: Callable[[], float] = time.monotonic,
                 own_cpu: Callable[[], float] = time.process_time) -> None:
        self._stat_path = Path(stat_path)
        self._wall, self._own_cpu = wall, own_cpu
        self._started: tuple[float, float, float] | None = None
        self.start()

    def _host_busy_seconds(self) -> float | None:
        try:
            line = self._stat_path.read_text(encoding="ascii").split("\n", 1)[0]
            ticks = [int(v) for v in line.split()[1:]]
            per_second = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, AttributeError):
            return None
        return sum(ticks[i] for i in _BUSY_FIELDS if i < len(ticks)) / per_second

    def start(self) -> CpuContention:
        """Measure from now on."""
        host = self._host_busy_seconds()
        self._started = None if host is None else (self._wall(), self._own_cpu(), host)
        return self

    def others_cores(self) -> float | None:
        """Cores other processes kept busy on average since :meth:`start` (``None``:
        unknown)."""
        host = self._host_busy_seconds()
        if host is None or self._started is None:
            return None
        wall0, own0, host0 = self._started
        wall = self._wall() - wall0
        if wall <= 0:
            return 0.0
        others = (host - host0) - (self._own_cpu() - own0)
        return max(0.0, others / wall)


def free_cores(others_cores: float | None, cores: int | None = None) -> int | None:
    """The cores left to this process when other processes keep ``others_cores`` of the
    ``cores`` (default: all of this machine's) busy on average, rounded, at least 1; ``None``
    when ``others_cores`` is unknown. More intra-op threads than that wait on each other: on
    2 cores beside another 2-thread job a training epoch went from 205 s to 1021 s."""
    if others_cores is None:
        return None
    cores = cores or os.cpu_count() or 1
    return max(1, min(cores, math.floor(cores - others_cores + 0.5)))


def default_cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gkpd"
    return Path(root) / "latency.json"


@cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_key(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} | {device.type}: {where} | {dtype}"


class LatencyCache:
    """Seconds per forward call, by key, in a JSON file (``path=None``: memory only).

    A missing, unreadable or foreign file is an empty cache (it is only ever a cache); saving
    writes a temp file and renames it, so a crash never leaves half a file.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[str, float] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                log.warning("ignoring unreadable latency cache %s: %s", self.path, error)
                return
            if isinstance(data, dict) and data.get("version") == _CACHE_VERSION:
                self.entries = {
                    str(k): float(v)
                    for k, v in data.get("entries", {}).items()
                    if isinstance(v, int | float) and v > 0
                }

    def get(self, key: str) -> float | None:
        return self.entries.get(key)

    def put(self, key: str, seconds: float) -> None:
        self.entries[key] = float(seconds)
        self._dirty = True

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": _CACHE_VERSION, "entries": dict(sorted(self.entries.items()))}
        atomic_write_text(self.path, json.dumps(payload, indent=0) + "\n")
        self._dirty = False


def time_interleaved(
    calls: dict[Hashable, Callable[[], object]], rounds: int = _ROUNDS, warmup: int = _WARMUP,
    *, min_seconds: float = 0.0, max_rounds: int = _MAX_ROUNDS,
) -> dict[Hashable, float]:
    """Median seconds of each call, timed round by round so that load changes hit all, each
    round in a random order (seeded); where CUDA is in use, to the end of the kernels each
    call queued.

    With ``min_seconds``, rounds are added (up to ``max_rounds``) until the fastest call has
    run that long in total: a burst of load on a shared machine lasts milliseconds, which is
    all of 7 rounds of a 0.2 ms layer, and the median of such rounds is the burst's."""
    samples: dict[Hashable, list[float]] = {k: [] for k in calls}
    keys = list(calls)

    # a CUDA call returns before its kernels have run: wait for them at both ends of a call
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)

    # each round in a new order: in a fixed order the first call of a round ran up to 1.5x
    # faster than the same computation later in it, and a call right after a large model
    # 2-3% slower than the same call after another one (this host), which rotating the order
    # kept on the same call; seeded, so that a rerun times in the same orders
    orders = random.Random(0)

    def run(n: int) -> None:
        for _ in range(n):
            for key in orders.sample(keys, len(keys)):
                sync()
                start = time.perf_counter()
                calls[key]()
                sync()
                samples[key].append(time.perf_counter() - start)

    # no_grad rather than inference_mode: compiled callables guard on the grad mode they
    # were compiled in, and inference tensors would send them back to the compiler
    with torch.no_grad():
        for _ in range(warmup):
            for call in calls.values():
                call()
        run(rounds)
        if calls and min_seconds > 0:
            fastest = min(statistics.median(v) for v in samples.values())
            wanted = min(max_rounds, math.ceil(min_seconds / max(fastest, 1e-9)))
            run(max(0, wanted - rounds))
    return {k: statistics.median(v) for k, v in samples.items()}


@contextmanager
def _threads(threads: int | None):
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    example_input: object,
    *,
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time ``model`` on ``example_input`` (a tensor, a tuple of positional or a dict of
    keyword inputs) in eval mode without gradients.

    ``warmup`` untimed calls, then ``repeats`` timed ones; ``threads`` sets torch's intra-op
    thread count for the measurement (restored afterwards). Returns ``median_ms``, ``min_ms``,
    ``mean_ms``, ``max_ms``, ``repeats``, ``warmup``, ``threads`` (as used) and ``batch``
    (:attr:`gkpd.inputs.ModelCall.batch`). Every module's train/eval mode is restored.
    """
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    call = ModelCall.of(example_input)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    times: list[float] = []
    with eval_mode(model), _threads(threads), torch.no_grad():
        used_threads = torch.get_num_threads()
        for _ in range(warmup):
            call.run_or_explain(model)
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            call.run_or_explain(model)  # as fast as run when nothing fails (zero-cost try)
            _sync(device)
            times.append((time.perf_counter() - start) * 1000.0)
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "max_ms": max(times),
        "repeats": repeats,
        "warmup": warmup,
        "threads": used_threads,
        "batch": call.batch,
    }
