"""``gkpd bench speed``: inference latency of the dense model, of GKPD at several ratios (latency
and error objectives) and of TensorLy-Torch's factorized convolutions at the same size.

Every variant of one batch size and backend is timed round by round in the same process
(``time_interleaved``), so the machine's load hits all alike; the table reports each one's
median and its speed-up over the dense model on the same backend. Backends: ``eager``,
``compile`` (``torch.compile``, inductor) and ``onnxruntime`` (through :func:`gkpd.export.to_onnx`).
Peak memory is the growth of a fresh process's peak resident set over one forward pass.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "onnxruntime")
PEERS = ("cp", "tucker", "tt")
RESULTS_JSON = "speed.json"
RESULTS_MD = "speed.md"


@dataclass
class SpeedConfig:
    ratios: tuple[float, ...] = (2.0, 5.0, 10.0)
    batches: tuple[int, ...] = (1, 64)
    backends: tuple[str, ...] = BACKENDS
    # compile and onnxruntime only for the variants at these ratios (compiling is slow)
    graph_ratios: tuple[float, ...] = (5.0,)
    peers: tuple[str, ...] = PEERS
    peer_ratios: tuple[float, ...] = (5.0,)
    rounds: int = 15
    threads: int | None = None
    memory: bool = True
    latency_cache: str | None = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("backends", "peers"):
            known = BACKENDS if name == "backends" else PEERS
            bad = [v for v in getattr(self, name) if v not in known]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; expected some of {list(known)}")
        for name in ("ratios", "graph_ratios", "peer_ratios"):
            if any(not r > 1 for r in getattr(self, name)):
                raise ValueError(f"{name} must all be > 1, got {getattr(self, name)}")
        if not self.batches or any(isinstance(b, bool) or b < 1 for b in self.batches):
            raise ValueError(f"batches must be positive ints, got {self.batches}")
        if self.rounds < 3:
            raise ValueError(f"rounds must be >= 3, got {self.rounds}")


@dataclass
class Variant:
    name: str
    model: nn.Module
    params: int
    ratio: float
    batch: int | None = None  # a latency plan is made for one batch size
    graph: bool = False  # also compiled / exported
    notes: str = ""


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tltorch_peer(model: nn.Module, plan, factorization: str) -> nn.Module:
    """``model`` with every layer the GKPD ``plan`` compressed (convolutions) replaced by
    TensorLy-Torch's ``FactorizedConv`` of the same layer ratio (``rank`` as a fraction of the
    layer's parameters), decomposed from the trained weights, run factorized."""
    try:
        import tltorch
    except ImportError as error:
        raise ImportError(
            "the speed benchmark's peers need TensorLy-Torch: pip install tensorly-torch"
        ) from error
    from gkpd.apply import _set_submodule

    peer = copy.deepcopy(model)
    for entry in plan.compressed_layers:
        conv = peer.get_submodule(entry.name)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            continue
        fraction = (entry.params - (conv.bias.numel() if conv.bias is not None else 0)) / (
            conv.weight.numel()
        )
        layer = tltorch.FactorizedConv.from_conv(
            conv, rank=fraction, factorization=factorization, implementation="factorized",
        )
        _set_submodule(peer, entry.name, layer)
    return peer.eval()


def build_variants(model: nn.Module, example: torch.Tensor, config: SpeedConfig) -> list[Variant]:
    from gkpd.apply import apply_
    from gkpd.plan import plan as make_plan

    model = model.eval()
    dense = _params(model)
    variants = [Variant("dense", model, dense, 1.0, graph=True)]
    for ratio in config.ratios:
        graph = ratio in config.graph_ratios
        error_plan = make_plan(model, example[:1], ratio=ratio)
        compressed = apply_(copy.deepcopy(model), error_plan).eval()
        variants.append(Variant(f"gkpd {ratio:g}x (error)", compressed, _params(compressed),
                                dense / _params(compressed), graph=graph))
        for batch in config.batches:
            started = time.perf_counter()
            latency_plan = make_plan(
                model, example[:1], ratio=ratio, objective="latency", latency_batch=batch,
                latency_cache=config.latency_cache,
            )
            fast = apply_(copy.deepcopy(model), latency_plan).eval()
            orders = [e.order for e in latency_plan.compressed_layers]
            paths = ", ".join(f"{o}: {orders.count(o)}" for o in sorted(set(orders)))
            variants.append(Variant(
                f"gkpd {ratio:g}x (latency@b{batch})", fast, _params(fast),
                dense / _params(fast), batch=batch, graph=graph,
                notes=f"planned in {time.perf_counter() - started:.1f} s; layers by path: {paths}",
            ))
        if ratio in config.peer_ratios:
            for factorization in config.peers:
                peer = tltorch_peer(model, error_plan, factorization)
                variants.append(Variant(f"tltorch {factorization} {ratio:g}x", peer,
                                        _params(peer), dense / _params(peer), graph=graph))
    return variants


def _onnx_call(model: nn.Module, x: torch.Tensor, folder: Path, name: str,
               threads: int) -> Callable[[], object]:
    import onnxruntime

    from gkpd.export import to_onnx

    path = to_onnx(model, x, folder / f"{len(list(folder.iterdir()))}.onnx", verify=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    log.info("onnx: %s (%d bytes)", name, path.stat().st_size)
    return lambda: session.run(None, feed)


def _peak_memory_child(model: nn.Module, x: torch.Tensor, queue) -> None:
    torch.set_num_threads(1)
    with open("/proc/self/statm") as f:
        start_kb = int(f.read().split()[1]) * resource.getpagesize() // 1024
    with torch.inference_mode():
        model(x)
    queue.put(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_kb))


def peak_memory_mb(model: nn.Module, x: torch.Tensor) -> float | None:
    """MB a fresh process's peak resident set grows by over one forward of ``model`` on ``x``
    (weights included once they are touched; ``None`` where it cannot be measured)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_peak_memory_child, args=(model, x, queue))
    child.start()
    child.join(300)
    if child.exitcode != 0:
        log.warning("peak memory: the measuring process failed (exit %s)", child.exitcode)
        return None
    return queue.get() / 1024


def run_speed(model: nn.Module, example_input: torch.Tensor, *, config: SpeedConfig,
              out: str | Path | None = None) -> dict[str, Any]:
    """Build every variant, time it, and write ``speed.json``/``speed.md`` under ``out``."""
    from gkpd.plan.latency import time_interleaved

    config.validate()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    threads = torch.get_num_threads()
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("example_input must be a tensor (N, C, ...)")
    variants = build_variants(model, example_input, config)
    rows = {v.name: {"params": v.params, "ratio": round(v.ratio, 3), "notes": v.notes,
                     "times_ms": {}} for v in variants}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for batch in config.batches:
            x = torch.randn(batch, *example_input.shape[1:])
            for backend in config.backends:
                chosen = [v for v in variants if (backend == "eager" or v.graph)
                          and v.batch in (None, batch)]
                calls = {}
                for v in chosen:
                    try:
                        calls[v.name] = _call(v.model, x, backend, Path(tmp), v.name, threads)
                    except Exception as error:  # noqa: BLE001 — recorded, the others go on
                        log.warning("%s on %s: %s", v.name, backend, error)
                        rows[v.name]["times_ms"][f"{backend}@b{batch}"] = f"failed: {error}"[:200]
                log.info("timing %d variants, batch %d, %s", len(calls), batch, backend)
                times = time_interleaved(calls, rounds=config.rounds, warmup=3)
                dense = times.get("dense")
                for name, seconds in times.items():
                    rows[name]["times_ms"][f"{backend}@b{batch}"] = {
                        "ms": round(seconds * 1e3, 4),
                        "speedup": round(dense / seconds, 3) if dense else None,
                    }
        if config.memory:
            batch = max(config.batches)
            x = torch.randn(batch, *example_input.shape[1:])
            for v in variants:
                if v.batch in (None, batch):
                    rows[v.name]["peak_memory_mb"] = peak_memory_mb(v.model, x)
    result = {
        "config": {k: v for k, v in asdict(config).items() if k != "extra"} | config.extra,
        "device": _describe_machine(threads),
        "torch": torch.__version__,
        "input_shape": list(example_input.shape[1:]),
        "variants": rows,
    }
    if out is not None:
        write_results(Path(out), result)
    return result


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
    from gkpd.plan.latency import cpu_model

    return f"{cpu_model()}, {threads} torch thread(s)"


def format_table(result: dict[str, Any]) -> str:
    keys = list(dict.fromkeys(k for row in result["variants"].values() for k in row["times_ms"]))
    header = ["variant", "params", "ratio", *[f"{k} ms (×dense)" for k in keys], "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in result["variants"].items():
        cells = [name, f"{row['params']:,}", f"{row['ratio']:.2f}"]
        for k in keys:
            t = row["times_ms"].get(k)
            if isinstance(t, dict):
                cells.append(f"{t['ms']:.2f} ({t['speedup']:.2f}×)" if t["speedup"] else
                             f"{t['ms']:.2f}")
            else:
                cells.append("–" if t is None else "failed")
        memory = row.get("peak_memory_mb")
        cells.append("–" if memory is None else f"{memory:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {name}: {row['notes']}" for name, row in result["variants"].items()
             if row["notes"]]
    failures = [f"- {name} {k}: {t}" for name, row in result["variants"].items()
                for k, t in row["times_ms"].items() if isinstance(t, str)]
    head = (f"Input {tuple(result['input_shape'])}, {result['device']}, torch "
            f"{result['torch']}; median of {result['config']['rounds']} interleaved rounds; "
            "×dense: the dense model's time on the same backend and batch divided by the "
            "variant's (above 1: faster).")
    return "\n".join([head, "", *lines, "", *notes, *failures]) + "\n"


def write_results(out: Path, result: dict[str, Any]) -> None:
    from gkpd.train.checkpoint import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RESULTS_JSON, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / RESULTS_MD, format_table(result))


def variants_at(result: dict[str, Any], key: str) -> dict[str, float]:
    """``{variant: speed-up over dense}`` for one ``backend@bN`` column."""
    return {n: r["times_ms"][key]["speedup"] for n, r in result["variants"].items()
            if isinstance(r["times_ms"].get(key), dict)}


__all__: Sequence[str] = ["SpeedConfig", "run_speed", "tltorch_peer", "format_table",
                          "variants_at"]
