"""Wall-clock latency of a model's forward pass (CPU or GPU), median of repeats."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["measure_latency"]


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
    """Time ``model(*example_input)`` in eval mode without gradients.

    ``warmup`` untimed calls, then ``repeats`` timed ones; ``threads`` sets torch's intra-op
    thread count for the measurement (restored afterwards). Returns ``median_ms``, ``min_ms``,
    ``mean_ms``, ``max_ms``, ``repeats``, ``warmup``, ``threads`` (as used) and ``batch``
    (the first input's leading dimension). The model's train/eval mode is restored.
    """
    for name, value, minimum in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with _threads(threads), torch.no_grad():
            used_threads = torch.get_num_threads()
            for _ in range(warmup):
                model(*args)
            _sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(*args)
                _sync(device)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "max_ms": max(times),
        "repeats": repeats,
        "warmup": warmup,
        "threads": used_threads,
        "batch": int(first.shape[0]) if first is not None and first.dim() else 1,
    }
