"""``gkpd bench speed``: inference latency of the dense model, of GKPD at several ratios (latency
and error objectives) and of TensorLy-Torch's factorized convolutions at the same size.

Every variant of one batch size and backend is timed round by round in the same process
(``time_interleaved``), so the machine's load hits all alike; the table reports each one's
median and its speed-up over the dense model on the same backend. Backends: ``eager``,
``compile`` (``torch.compile``, inductor) and ``onnxruntime`` (through :func:`gkpd.export.to_onnx`).
Peak memory is the growth of a fresh process's peak resident set from loading the model to the
end of one forward pass (:func:`peak_memory_mb`).

About 400 lines on purpose: the config, the variants it builds and the interleaved timing of
all of them are one measurement; split apart, each part would take the whole config.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import numbers
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkpd.bench.memory import peak_memory_mb
from gkpd.bench.peers import PEERS, build_peer, tltorch_peer
from gkpd.layout import LAYOUTS
from gkpd.runtime import describe_allocator, describe_openmp, keep_freed_memory

__all__ = [
    "BACKENDS", "LAYOUTS", "OBJECTIVES", "PEERS", "RESULTS_JSON", "RESULTS_MD", "SpeedConfig",
    "Variant", "build_variants", "format_table", "peak_memory_mb", "run_speed", "tltorch_peer",
    "variants_at", "write_results",
]

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnxruntime")
OBJECTIVES = ("error", "latency")
RESULTS_JSON = "speed.json"
RESULTS_MD = "speed.md"
_RECOMPILES = 100_000  # see _unlimited_recompiles


@dataclass
class SpeedConfig:
    """What ``gkpd bench speed`` measures. ``graph_ratios`` / ``peer_ratios``: the ratios (of
    ``ratios``) whose variants also run compiled and in onnxruntime / get TensorLy-Torch peers;
    ``None``: all of ``ratios``. ``threads``: torch (and onnxruntime) threads while timing
    (``None``: torch's setting). ``objectives``: the GKPD plans, for the smallest error and/or
    (one per batch size) for latency, which times every layer's options on this machine (for
    ResNet-50 at 224x224 that takes long; a cache keeps the timings). ``latency_cache``: that
    cache's file (``"default"``, a path, or ``None`` for none)."""

    ratios: tuple[float, ...] = (2.0, 5.0, 10.0)
    batches: tuple[int, ...] = (1, 64)
    objectives: tuple[str, ...] = OBJECTIVES
    backends: tuple[str, ...] = BACKENDS
    # compile and onnxruntime only for the variants at these ratios (compiling is slow)
    graph_ratios: tuple[float, ...] | None = (5.0,)
    peers: tuple[str, ...] = PEERS
    peer_ratios: tuple[float, ...] | None = (5.0,)
    rounds: int = 15
    threads: int | None = None
    memory: bool = True
    latency_cache: str | Path | None = "default"
    # latency plans accept configurations up to 1 + slack times the smallest error; one plan
    # per slack (and batch)
    latency_slacks: tuple[float, ...] = (0.1,)
    # "contiguous" (NCHW, as models come) and/or "channels_last": the dense model runs in
    # each (fed inputs in that layout); the latency plans are timed in each and run in the
    # faster (CompressionPlan.layout), fed NCHW inputs, as are error plans; peers run in NCHW
    layouts: tuple[str, ...] = LAYOUTS
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        ratio_ok = lambda r: _is_real(r) and r > 1  # noqa: E731
        self._check("backends", lambda b: b in BACKENDS, f"some of {list(BACKENDS)}", empty=False)
        self._check("peers", lambda p: p in PEERS, f"some of {list(PEERS)}")
        self._check("objectives", lambda o: o in OBJECTIVES, f"some of {list(OBJECTIVES)}",
                    empty=False)
        self._check("ratios", ratio_ok, "numbers > 1", empty=False)
        self._check("latency_slacks", lambda v: _is_real(v) and v >= 0, "numbers >= 0",
                    empty=False)
        self._check("layouts", lambda v: v in LAYOUTS, f"some of {list(LAYOUTS)}", empty=False)
        self._check("batches", _is_positive_int, "positive ints", empty=False)
        graph = any(b != "eager" for b in self.backends)
        for name, used in (("graph_ratios", graph), ("peer_ratios", bool(self.peers))):
            if used and getattr(self, name) is not None:
                self._check(name, lambda r: ratio_ok(r) and r in self.ratios,
                            f"numbers among ratios {list(self.ratios)}")
        if not _is_positive_int(self.rounds) or self.rounds < 3:
            raise ValueError(f"rounds must be an int >= 3, got {self.rounds!r}")
        if self.threads is not None and not _is_positive_int(self.threads):
            raise ValueError(f"threads must be a positive int or None, got {self.threads!r}")
        if not isinstance(self.memory, bool):
            raise ValueError(f"memory must be a bool, got {self.memory!r}")
        if self.latency_cache is not None and not isinstance(self.latency_cache, str | Path):
            raise ValueError(
                f"latency_cache must be 'default', a path or None, got {self.latency_cache!r}"
            )
        if not isinstance(self.extra, dict):
            raise ValueError(f"extra must be a dict, got {type(self.extra).__name__}")

    def _check(self, name: str, ok: Callable[[Any], bool], expected: str,
               empty: bool = True) -> None:
        values = getattr(self, name)
        if (isinstance(values, str) or not isinstance(values, Sequence)
                or not all(ok(v) for v in values) or len(set(values)) != len(values)
                or not (values or empty)):
            raise ValueError(f"{name} must be a{'' if empty else ' non-empty'} sequence of "
                             f"{expected} without duplicates, got {values!r}")

    def graph_at(self, ratio: float) -> bool:
        return self.graph_ratios is None or ratio in self.graph_ratios

    def peers_at(self, ratio: float) -> bool:
        return self.peer_ratios is None or ratio in self.peer_ratios


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass
class Variant:
    name: str
    model: nn.Module
    params: int
    ratio: float
    batch: int | None = None  # a latency plan is made for one batch size
    graph: bool = False  # also compiled / exported
    notes: str = ""
    channels_last: bool = False  # model and inputs in torch.channels_last
    layout_only: bool = False  # differs from another variant only in memory layout


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_variants(model: nn.Module, example: torch.Tensor, config: SpeedConfig) -> list[Variant]:
    """Dense, GKPD (the error plan, and a latency plan per batch size, as ``objectives`` say)
    and the TensorLy-Torch peers (sized by the error plan) at every ratio of ``config``;
    ``model`` is put in eval mode, the others are copies."""
    from gkpd.apply import apply_
    from gkpd.plan import LatencyObjective
    from gkpd.plan import plan as make_plan

    model = model.eval()
    dense = _params(model)
    variants = [Variant("dense", model, dense, 1.0, graph=True)]
    if "channels_last" in config.layouts:
        variants.append(Variant("dense [channels_last]", _channels_last(model), dense, 1.0,
                                graph=True, channels_last=True, layout_only=True))
    for ratio in config.ratios:
        graph = config.graph_at(ratio)
        peers = config.peers if config.peers_at(ratio) else ()
        # each plan picks its layout among config.layouts itself
        layout = "auto" if len(config.layouts) > 1 else config.layouts[0]
        if "error" in config.objectives or peers:
            error_plan = make_plan(model, example[:1], ratio=ratio, layout=layout)
        if "error" in config.objectives:
            compressed = apply_(copy.deepcopy(model), error_plan).eval()  # in its layout
            timed = error_plan.options.get("model_latency")
            variants.append(Variant(
                f"gkpd {ratio:g}x (error)" + _layout_tag(error_plan), compressed,
                _params(compressed), dense / _params(compressed), graph=graph,
                notes=f"runs in {error_plan.layout}, called with NCHW inputs" + (
                    f" (the planner's timing at batch {timed['batch']}, ms: "
                    f"{_ms(timed['ms'])}; dense {_ms(timed['dense_ms'])})" if timed else ""),
            ))
        latency = [(b, s) for b in config.batches for s in config.latency_slacks
                   ] if "latency" in config.objectives else []
        for batch, slack in latency:
            started = time.perf_counter()
            latency_plan = make_plan(
                model, example[:1], ratio=ratio, objective=LatencyObjective(
                    batch=batch, slack=slack, cache=config.latency_cache, layout=layout,
                ),
            )
            fast = apply_(copy.deepcopy(model), latency_plan).eval()  # in the plan's layout
            runs = [e.settings.get("path") for e in latency_plan.compressed_layers]
            paths = ", ".join(f"{p}: {runs.count(p)}" for p in sorted(set(runs)))
            name = f"gkpd {ratio:g}x (latency@b{batch}"
            if len(config.latency_slacks) > 1:
                name += f", slack {slack:g}"
            name += ")" + _layout_tag(latency_plan)
            timed = latency_plan.options["model_latency"]
            variants.append(Variant(
                name, fast, _params(fast), dense / _params(fast), batch=batch, graph=graph,
                notes=f"planned in {time.perf_counter() - started:.1f} s; layers by path: "
                      f"{paths}; runs in {latency_plan.layout}, called with NCHW inputs "
                      f"(the planner's timing, ms: {_ms(timed['ms'])}; dense "
                      f"{_ms(timed['dense_ms'])})",
            ))
        for factorization in peers:
            peer, skipped = build_peer(model, error_plan, factorization, False)
            notes = "random factors in the decomposition's shapes (they time the same)"
            if skipped:
                notes += f"; {skipped} compressed layer(s) TensorLy-Torch cannot take left dense"
            variants.append(Variant(f"tltorch {factorization} {ratio:g}x", peer, _params(peer),
                                    dense / _params(peer), graph=graph, notes=notes))
    return variants


def _channels_last(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def _layout_tag(plan) -> str:
    return f" [{plan.layout}]" if plan.layout != "contiguous" else ""


def _ms(by_layout: dict[str, float]) -> str:
    return ", ".join(f"{layout} {ms:.3g}" for layout, ms in by_layout.items())


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.to(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _onnx_call(model: nn.Module, x: torch.Tensor, folder: Path, name: str,
               threads: int) -> Callable[[], object]:
    import onnxruntime

    from gkpd.export import to_onnx

    path = to_onnx(model, x, folder / f"{len(list(folder.glob('*.onnx')))}.onnx", verify=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    log.info("onnx: %s (%d bytes)", name, path.stat().st_size)
    return lambda: session.run(None, feed)


def _require(module: str, why: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs {module}: pip install {install}")


def run_speed(model: nn.Module, example_input: torch.Tensor, *, config: SpeedConfig,
              out: str | Path | None = None) -> dict[str, Any]:
    """Build every variant, time it, and write ``speed.json``/``speed.md`` under ``out``.

    ``example_input``: one input (batch first; its batch size does not matter). Torch's
    thread count is set to ``config.threads`` for the run and restored after. glibc's malloc
    is set to keep freed memory (:func:`gkpd.runtime.keep_freed_memory`) for the rest of the
    process, so that the timings do not depend on what the kernel's page faults cost at the
    moment; the table's header names the allocator (:func:`gkpd.runtime.describe_allocator`)."""
    from gkpd.timing import time_interleaved

    config.validate()
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise TypeError(f"example_input must be a tensor (N, C, ...), got "
                        f"{type(example_input).__name__} {getattr(example_input, 'shape', '')}")
    if "onnxruntime" in config.backends:
        _require("onnxruntime", "backend 'onnxruntime'", "onnxruntime onnx onnxscript")
    if config.peers and (config.peer_ratios is None or config.peer_ratios):
        _require("tltorch", f"peers {list(config.peers)}", "tensorly-torch")
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        threads = torch.get_num_threads()
        keep_freed_memory()
        variants = build_variants(model, example_input, config)
        rows = {v.name: {"params": v.params, "ratio": round(v.ratio, 3), "notes": v.notes,
                         "times_ms": {}} for v in variants}
        generator = torch.Generator().manual_seed(0)
        shape = tuple(example_input.shape[1:])
        with tempfile.TemporaryDirectory() as tmp, _unlimited_recompiles():
            for batch in config.batches:
                x = torch.randn(batch, *shape, generator=generator, dtype=example_input.dtype)
                for backend in config.backends:
                    # an ONNX graph has no memory layout: dense in channels_last would export
                    # as dense; a plan timed in channels_last still runs its own paths
                    onnx = backend == "onnxruntime"
                    chosen = [v for v in variants if (backend == "eager" or v.graph)
                              and v.batch in (None, batch) and not (onnx and v.layout_only)]
                    key = f"{backend}@b{batch}"
                    calls = {}
                    for v in chosen:
                        try:
                            calls[v.name] = _call(v.model, _layout(x, v.channels_last and not onnx),
                                                  backend, Path(tmp), v.name, threads)
                        except Exception as error:  # noqa: BLE001 — recorded, the others go on
                            log.warning("%s on %s: %s", v.name, backend, error)
                            rows[v.name]["times_ms"][key] = f"failed: {error}"[:200]
                    log.info("timing %d variants, batch %d, %s", len(calls), batch, backend)
                    times = time_interleaved(calls, rounds=config.rounds, warmup=3)
                    dense = times.get("dense")
                    for name, seconds in times.items():
                        rows[name]["times_ms"][key] = {
                            "ms": float(f"{seconds * 1e3:.4g}"),
                            "speedup": 1.0 if name == "dense" else
                            (round(dense / seconds, 3) if dense else None),
                        }
        memory_batch = max(config.batches) if config.memory else None
        if config.memory:
            x = torch.randn(memory_batch, *shape, generator=generator, dtype=example_input.dtype)
            for v in variants:
                if v.batch in (None, memory_batch) and not v.channels_last:
                    log.info("peak memory: %s, batch %d", v.name, memory_batch)
                    peak = peak_memory_mb(v.model, x)
                    rows[v.name]["peak_memory_mb"] = None if peak is None else round(peak, 3)
    finally:
        torch.set_num_threads(previous_threads)
    config_dict = {k: v for k, v in asdict(config).items() if k != "extra"}
    config_dict["latency_cache"] = (None if config.latency_cache is None
                                    else str(config.latency_cache))
    result = {
        "config": config_dict | config.extra,
        "device": _describe_machine(threads),
        "torch": torch.__version__,
        "input_shape": list(shape),
        "memory_batch": memory_batch,
        "malloc": describe_allocator(),
        "openmp": describe_openmp(),
        "variants": rows,
    }
    result = json.loads(json.dumps(result))  # as speed.json has it (lists, not tuples)
    if out is not None:
        write_results(Path(out), result)
    return result


def _unlimited_recompiles():
    """Dynamo compiles a code object once per model instance and input shape, and past its
    recompile limit (8) silently runs the rest eager: every variant and batch of a run
    (and each instance of a layer whose forward breaks the graph, as TensorLy-Torch's do)
    must stay compiled for the compile column to mean anything."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=_RECOMPILES, accumulated_recompile_limit=_RECOMPILES)


def _call(model, x, backend, folder, name, threads) -> Callable[[], object]:
    """A callable running ``model`` on ``x`` with ``backend``, called once (compiling, and
    raising here if the backend cannot run the model)."""
    if backend == "eager":
        call = lambda: model(x)  # noqa: E731
    elif backend == "compile":
        compiled = torch.compile(model, dynamic=False)
        call = lambda: compiled(x)  # noqa: E731
    else:
        call = _onnx_call(model, x, folder, name, threads)
    with torch.no_grad():
        call()
    return call


def _describe_machine(threads: int) -> str:
    from gkpd.timing import cpu_model

    return f"{cpu_model()}, {threads} torch thread(s)"


def format_table(result: dict[str, Any]) -> str:
    """The markdown of ``speed.md``: one row per variant, one column per backend and batch."""
    variants = result["variants"]
    keys = list(dict.fromkeys(k for row in variants.values() for k in row["times_ms"]))
    memory = result.get("memory_batch") is not None
    header = ["variant", "params", "ratio", *[f"{k} ms (×dense)" for k in keys]]
    header += [f"peak MB @b{result['memory_batch']}"] if memory else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in variants.items():
        cells = [name, f"{row['params']:,}", f"{row['ratio']:.2f}"]
        for k in keys:
            t = row["times_ms"].get(k)
            if isinstance(t, dict):
                cells.append(f"{t['ms']:.3g} ({t['speedup']:.2f}×)" if t["speedup"] else
                             f"{t['ms']:.3g}")
            else:
                cells.append("–" if t is None else "failed")
        if memory:
            peak = row.get("peak_memory_mb")
            cells.append("–" if peak is None else f"{peak:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {name}: {row['notes']}" for name, row in variants.items() if row["notes"]]
    failures = [f"- {name} {k}: {t}" for name, row in variants.items()
                for k, t in row["times_ms"].items() if isinstance(t, str)]
    head = (f"Input {tuple(result['input_shape'])}, {result['device']}, torch "
            f"{result['torch']}; malloc: {result.get('malloc', 'not recorded')}; OpenMP: "
            f"{result.get('openmp', 'not recorded')}; median of "
            f"{result['config']['rounds']} interleaved rounds; "
            "×dense: the dense model's time on the same backend and batch divided by the "
            "variant's (above 1: faster).")
    if memory:
        head += (" Peak MB: growth of a fresh process's peak resident set from loading the "
                 "model to the end of one eager forward pass (weights, activations, workspaces).")
    command = result["config"].get("command")
    if command:  # what produced the file, for the record
        head = f"Command: `{command}`\n\n{head}"
    return "\n".join([head, "", *lines, "", *notes, *failures]).rstrip("\n") + "\n"


def write_results(out: Path, result: dict[str, Any]) -> None:
    from gkpd.files import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_JSON, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / RESULTS_MD, format_table(result))


def variants_at(result: dict[str, Any], key: str) -> dict[str, float]:
    """``{variant: speed-up over dense}`` for one ``backend@bN`` column."""
    return {n: r["times_ms"][key]["speedup"] for n, r in result["variants"].items()
            if isinstance(r["times_ms"].get(key), dict)}
