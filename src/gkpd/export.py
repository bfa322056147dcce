"""Deploy a compressed model: merge it back to dense layers, or export it to ONNX.

* :func:`merge` swaps every module that has a ``to_dense()`` method (the Kronecker layers,
  and any other factorized layer that offers one) for the dense ``nn.Conv*d`` / ``nn.Linear``
  it stands for, and an unpacked LSTM/GRU/RNN for torch's module: the same function, the
  dense model's size and speed.
* :func:`to_onnx` writes an ONNX file with ``torch.onnx.export(..., dynamo=True)``, a dynamic
  batch dimension, the factors stored as they are (constant folding never multiplies them out
  into a dense weight, not even for a layer on the ``"weight"`` path), and checks it in
  onnxruntime against PyTorch before the file appears.
* :func:`export_program` is ``torch.export.export`` with a dynamic batch dimension; compressed
  models also run under ``torch.compile``.

onnx and onnxruntime are optional (``pip install 'gkpd[export]'``) and are imported only here,
when a function needs them.

Over 400 lines on purpose: merge, ONNX export and its onnxruntime check share the
deployment checks (inputs, dtype, the factors kept unfolded); they are one idea.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gkpd.files import atomic_write
from gkpd.inputs import ModelCall, eval_mode, output_tensors
from gkpd.layers.attention import fuse_again
from gkpd.transposed_linear import as_transposed, stored_transposed

__all__ = ["OnnxVerificationError", "default_opset", "export_program", "merge", "to_onnx"]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'gkpd[export]'"
# the dynamo exporter's own opsets start here; older ones go through onnx's version converter
_MIN_OPSET = 18


class OnnxVerificationError(RuntimeError):
    """The ONNX model's onnxruntime outputs differ from PyTorch's beyond the tolerance."""


# ----------------------------------------------------------------------------- merge


def _mergeable(module: nn.Module) -> bool:
    return callable(getattr(module, "to_dense", None)) or (
        isinstance(module, nn.Linear) and stored_transposed(module)
    )


def _dense_of(module: nn.Module) -> nn.Module:
    # a Conv1D's linear left dense is its own dense layer (made a Conv1D again below)
    dense = module.to_dense() if callable(getattr(module, "to_dense", None)) else module
    if not isinstance(dense, nn.Module):
        raise TypeError(
            f"{type(module).__name__}.to_dense() returned a {type(dense).__name__}, "
            "expected an nn.Module"
        )
    reference = next(module.parameters(), None)
    if reference is not None:
        # a generic to_dense() may build on the default device or dtype
        dense = dense.to(device=reference.device, dtype=reference.dtype)
    dense.train(module.training)
    if stored_transposed(module) and isinstance(dense, nn.Linear):
        return as_transposed(dense)
    return dense


def merge(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every Kronecker layer replaced by the equivalent dense layer.

    Any submodule with a ``to_dense()`` method (``KroneckerConv*d``, ``KroneckerLinear``,
    other factorized layers that provide one) is replaced by what it returns, on the same
    device and dtype and in the same training mode; a layer shared by several parents stays
    shared. Baselines built from plain ``nn`` layers (svd, tucker, cp) are left as they are.
    An unpacked LSTM, GRU or RNN or one of their cells (:mod:`gkpd.layers.recurrent`,
    :mod:`gkpd.layers.recurrent_cells`) becomes torch's module where
    its gate layers are dense once merged (not where one is the svd baseline's), and a
    transformers ``Conv1D`` that was planned as a linear becomes a ``Conv1D`` again
    (:mod:`gkpd.transposed_linear`); an unpacked attention becomes ``nn.MultiheadAttention``
    and the transformer layers holding it run torch's fused kernels again
    (:func:`gkpd.layers.attention.fuse_again`). The merged model computes the same function with the
    dense architecture's parameter count.
    ``inplace=False`` (default) works on a deep copy; forward hooks registered on
    the replaced layers do not carry over.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if _mergeable(model):
        return _dense_of(model)
    merged: dict[int, nn.Module] = {}
    count = 0
    # children before their parents: an unpacked recurrent layer becomes torch's module once
    # its gate layers are dense (gkpd.layers.recurrent)
    for parent in reversed(list(model.modules())):
        for name, child in list(parent.named_children()):
            if not _mergeable(child):
                continue
            if id(child) not in merged:
                merged[id(child)] = _dense_of(child)
                count += merged[id(child)] is not child
            setattr(parent, name, merged[id(child)])
    fuse_again(model)  # transformer layers of torch's modules again run torch's fused kernels
    log.info("merged %d factorized layers into dense layers", count)
    return model


# ----------------------------------------------------------------------------- inputs


ExampleInput = Tensor | Sequence[Tensor] | Mapping[str, Any]
# keyword inputs may be constants of the call (flags, None) besides tensors
_CONSTANTS = (bool, int, float, str, type(None))


def _check_input(where: str, value: Any, constants: tuple[type, ...]) -> None:
    if isinstance(value, Tensor):
        if value.dim() == 0:
            raise ValueError(f"{where} is a scalar; expected a batch (N, ...)")
    elif not isinstance(value, constants):
        allowed = " or a constant (None, bool, int, float, str)" if constants else ""
        raise TypeError(f"{where} must be a tensor{allowed}, got {type(value).__name__}")


def _as_call(example_input: Any, model: nn.Module) -> ModelCall:
    """The example input as a call that fits ``model.forward``; a list counts as a tuple of
    positional inputs."""
    if isinstance(example_input, list):
        example_input = tuple(example_input)
    call = ModelCall.of(example_input)
    for i, value in enumerate(call.args):
        _check_input(f"example_input[{i}]", value, ())
    for key, value in call.kwargs.items():
        _check_input(f"example_input[{key!r}]", value, _CONSTANTS)
    if call.kwargs:
        try:
            inspect.signature(model.forward).bind(*call.args, **call.kwargs)
        except TypeError as error:
            raise TypeError(f"example_input does not fit {type(model).__name__}.forward: "
                            f"{error}") from error
    return call


def _batch_of(call: ModelCall) -> int:
    """The batch size: dim 0 of the first input. An input whose dim 0 differs (an (L, L)
    attention mask) is not batched: it keeps its shape in the file."""
    return int(call.tensors()[0].shape[0])


def _resized(call: ModelCall, batch: int, seed: int = 0) -> ModelCall:
    """Inputs like ``call``'s with another batch size (random for floats, repeated
    otherwise); inputs that are not batched stay as they are."""
    gen = torch.Generator().manual_seed(seed)
    old = _batch_of(call)

    def resize(arg: Tensor) -> Tensor:
        if arg.shape[0] != old:
            return arg
        if arg.is_floating_point():
            shape = (batch, *arg.shape[1:])
            return torch.randn(shape, generator=gen, dtype=arg.dtype).to(arg.device)
        return arg[torch.arange(batch, device=arg.device) % arg.shape[0]]

    return call.map(resize)


def _trace_inputs(model: nn.Module, call: ModelCall,
                  dynamic_batch: bool) -> tuple[ModelCall, tuple | dict | None]:
    """The inputs to trace with, and ``dynamic_shapes`` for ``torch.export``: one per
    positional input, or (with keyword inputs) by the names of ``model.forward``'s arguments;
    dim 0 of every batched input (:func:`_batch_of`) is the symbolic ``batch``.

    torch.export specializes dims of size 1, so an example batch of 1 would fix the batch
    size: it is traced as a batch of 2 (the example twice) instead."""
    if not dynamic_batch:
        return call, None
    batch = _batch_of(call)
    unbatched = {int(t.shape[0]) for t in call.tensors() if t.shape[0] != batch}
    if unbatched:  # a mask of shape (L, L), or a mistake: say which
        warnings.warn(
            f"example_input ({call.describe()}): inputs whose dim 0 is not the first input's "
            f"batch size {batch} are exported with their fixed shapes", stacklevel=3,
        )
    if batch == 1:
        batch = next(b for b in range(2, 3 + len(unbatched)) if b not in unbatched)
        call = call.map(lambda t: torch.cat([t] * batch) if t.shape[0] == 1 else t)
    symbol = torch.export.Dim("batch")

    def spec(value: Any) -> dict | None:
        return {0: symbol} if isinstance(value, Tensor) and value.shape[0] == batch else None

    if not call.kwargs:
        return call, tuple(spec(a) for a in call.args)
    bound = inspect.signature(model.forward).bind(*call.args, **call.kwargs)
    return call, {name: spec(value) for name, value in bound.arguments.items()}


def export_program(
    model: nn.Module, example_input: ExampleInput, *, dynamic_batch: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` with the batch dimension (dim 0 of every input)
    dynamic when ``dynamic_batch``; ``example_input`` as for :func:`to_onnx`. Works on
    compressed models: the Kronecker layers trace without data-dependent control flow or
    guards on the batch size."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    call, dynamic_shapes = _trace_inputs(model, _as_call(example_input, model), dynamic_batch)
    try:
        return torch.export.export(model, call.args, call.kwargs, dynamic_shapes=dynamic_shapes)
    except Exception as error:
        raise _not_exported(model, error, "torch.export.export") from error


def _not_exported(model: nn.Module, error: Exception, exporter: str) -> ValueError:
    """A short error for an exporter's failure (torch's messages run to pages: the graph
    printed whole), its first lines kept."""
    while error.__cause__ is not None:  # torch.onnx wraps the cause in "next steps"
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()][:2]
    return ValueError(
        f"{exporter} failed on {type(model).__name__} ({type(error).__name__}: "
        f"{' '.join(lines)[:400]}). Models that torch.export cannot trace (e.g. "
        "nn.TransformerEncoder given a mask tensor, which it compares with a causal mask) fail "
        "alike uncompressed"
    )


# ----------------------------------------------------------------------------- onnx


def _require_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime: {_INSTALL_HINT} ({error})"
        ) from error
    try:
        import onnxscript  # noqa: F401  (torch's dynamo exporter builds with it)
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnxscript for torch's exporter: {_INSTALL_HINT} ({error})"
        ) from error
    return onnx, onnxruntime


def _max_opset() -> int:
    import onnx
    from torch.onnx import _constants  # private; fall back to the exporter's documented max

    torch_max = getattr(_constants, "ONNX_MAX_OPSET", 20)
    return min(int(torch_max), int(onnx.defs.onnx_opset_version()))


def default_opset() -> int:
    """The newest ONNX opset both torch's exporter and the installed onnx support."""
    _require_onnx()
    return _max_opset()


def _check_opset(opset: int | None) -> int:
    if opset is None:
        return _max_opset()
    top = _max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= top:
        raise ValueError(
            f"opset must be an int from {_MIN_OPSET} to {top} (torch's ONNX exporter and the "
            f"installed onnx), got {opset!r}"
        )
    return opset


def _check_path(path: str | os.PathLike) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a directory; expected the .onnx file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"path {path}: its parent {path.parent} is not a directory")
    return path


# constant results up to this many elements may be stored even if larger than their inputs
_SMALL_CONSTANT = 1024


def _known_size(value) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    dims = list(shape)
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else None


def _folds_without_growth(node) -> bool | None:
    """``should_fold`` for onnxscript's constant folding: never fold a node whose result is
    larger than its constant inputs. The "weight" path of a Kronecker layer builds
    ``Σ_r a[r] ⊗ b[r]`` from the factors; folded, the file would store that dense weight
    instead of the factors. Reshapes and transposes of the factors still fold (``None``:
    the folder's own rules decide)."""
    sizes_in = [_known_size(v) for v in node.inputs if v is not None]
    sizes_out = [_known_size(v) for v in node.outputs]
    if None in sizes_in or None in sizes_out:
        return None
    if sum(sizes_out) > max(_SMALL_CONSTANT, sum(sizes_in)):
        return False
    return None


def _optimize(program) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's constant folding and
    clean-ups, then its fusions), with folding that never multiplies factors out."""
    import onnxscript

    onnxscript.optimizer.optimize_ir(program.model, should_fold=_folds_without_growth)
    from onnxscript.rewriter import onnx_fusions

    onnx_fusions.fuse(program.model)


def _strip_debug_info(proto) -> None:
    """Drop what only helps debugging the exporter: node names, stack traces with local file
    paths, FX node texts, the export signature, intermediate value_info, and the long names
    of intermediate values. The graph and its weights are untouched; the names of inputs,
    outputs and initializers (the parameters) stay. In a compressed model this text is a
    sizeable share of the file (4/5 of it for ResNet-32 at 5x), not a rounding error."""
    graph = proto.graph
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        del node.metadata_props[:]
    del graph.metadata_props[:]
    del graph.value_info[:]
    graph.doc_string = ""
    if any(attr.HasField("g") or len(attr.graphs) for node in graph.node
           for attr in node.attribute):
        return  # subgraphs may refer to outer names: keep them
    # the exporter's intermediate names ("val_2154", "view_182") become short ones
    keep = {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    short: dict[str, str] = {}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name and name not in keep:
                short.setdefault(name, f"t{len(short)}")
                node.output[i] = short[name]
        for i, name in enumerate(node.input):
            if name in short:
                node.input[i] = short[name]


def _compare(session, model: nn.Module, call: ModelCall, atol: float, rtol: float,
             what: str) -> float:
    """Run ``call`` through onnxruntime and PyTorch; raise beyond tolerance; the max |diff|."""
    import numpy as np

    names = [i.name for i in session.get_inputs()]
    feeds = {name: arg.detach().cpu().numpy()
             for name, arg in zip(names, call.tensors(), strict=True)}
    try:
        got = session.run(None, feeds)
    except Exception as error:  # onnxruntime's own errors (Fail, InvalidArgument, ...)
        first = str(error).strip().splitlines()[0][:400] if str(error).strip() else ""
        raise OnnxVerificationError(
            f"onnxruntime could not run the exported model ({what}): {type(error).__name__}: "
            f"{first}. An operator of a newer opset may be beyond this onnxruntime: try an "
            f"older opset (opset={_MIN_OPSET}), or verify=False to keep the file unchecked"
        ) from error
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in output_tensors(call.run(model))]
    if len(got) != len(expected):
        raise OnnxVerificationError(
            f"the ONNX model has {len(got)} outputs, PyTorch {len(expected)} ({what})"
        )
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape:
            raise OnnxVerificationError(
                f"ONNX output {i} has shape {g.shape}, PyTorch {e.shape} ({what})"
            )
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        excess = diff - (atol + rtol * np.abs(e.astype(np.float64)))
        if not np.all(np.isfinite(g)) and np.all(np.isfinite(e)):
            raise OnnxVerificationError(f"ONNX output {i} has non-finite values ({what})")
        if excess.size and float(excess.max()) > 0:
            raise OnnxVerificationError(
                f"onnxruntime and PyTorch differ on output {i} ({what}): max |difference| "
                f"{float(diff.max()):.3g} exceeds atol={atol:g} + rtol={rtol:g}·|expected|"
            )
    return worst


def _verify(tmp: str, model: nn.Module, call: ModelCall, dynamic_batch: bool,
            atol: float, rtol: float) -> float:
    _, ort = _require_onnx()
    session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    batch = _batch_of(call)
    worst = _compare(session, model, call, atol, rtol, f"example input, batch {batch}")
    if dynamic_batch:
        other = batch + 4
        worst = max(worst, _compare(session, model, _resized(call, other), atol, rtol,
                                    f"random input, batch {other}"))
    return worst


def to_onnx(
    model: nn.Module,
    example_input: ExampleInput,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    keep_debug_info: bool = False,
) -> Path:
    """Export ``model`` to the ONNX file ``path`` and return it.

    The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript),
    at ``opset`` (default: :func:`default_opset`). ``example_input`` is a tensor, a tuple (or
    list) of tensors, or a dict of keyword inputs (tensors, or constants such as flags), batch
    first; with ``dynamic_batch`` dim 0 of every input and output is the symbolic ``batch``
    (an input whose dim 0 is not the first input's, such as an (L, L) attention mask, keeps its
    shape: give an example batch size that differs from its dim 0).
    Positional inputs are named ``input`` (``input_0``, ... for several) in the file, keyword
    inputs by their names. The model is exported in eval mode (every module's mode is restored
    after).
    Kronecker layers are exported as their two small stages, so the file stores the factors,
    not the dense weights. Debug-only metadata (stack traces with local paths, FX node text)
    is dropped unless ``keep_debug_info``.

    With ``verify`` the file is run in onnxruntime on ``example_input`` and, with a dynamic
    batch, on a random input of another batch size; outputs beyond ``atol + rtol·|torch|``
    of PyTorch's raise :class:`OnnxVerificationError` with the max difference. The file is
    written atomically (temporary file beside ``path``, then renamed): on any failure no file
    is left behind and an older ``path`` is untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    call = _as_call(example_input, model)
    path = _check_path(path)
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    onnx, _ = _require_onnx()
    opset = _check_opset(opset)
    device = next((p.device for p in model.parameters()), None)
    call = call.to(device)
    # keyword inputs keep their names; positional ones are named by position
    names = None if call.kwargs else (
        ["input"] if len(call.args) == 1 else [f"input_{i}" for i in range(len(call.args))]
    )
    worst: list[float] = []

    def write(tmp: str) -> None:
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    model, traced.args, kwargs=traced.kwargs, dynamo=True, opset_version=opset,
                    input_names=names,
                    dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
                    optimize=False,
                )
        except Exception as error:
            if "transformers.cache_utils" in str(error):  # "Found <class '...DynamicCache'>"
                raise ValueError(
                    "the model returns a Hugging Face key/value cache (past_key_values), which "
                    "torch.export cannot export: add use_cache=False to example_input"
                ) from error
            raise _not_exported(model, error, "torch.onnx.export") from error
        _optimize(program)
        proto = program.model_proto
        if not keep_debug_info:
            _strip_debug_info(proto)
        onnx.save_model(proto, tmp)
        if verify:
            worst.append(_verify(tmp, model, call, dynamic_batch, float(atol), float(rtol)))

    with eval_mode(model):  # every module back in its own mode afterwards
        with torch.no_grad():  # an input the model cannot take: torch.export's error is long
            call.run_or_explain(model)
        traced, dynamic_shapes = _trace_inputs(model, call, dynamic_batch)
        atomic_write(path, write)
    if worst:
        log.info("wrote %s (opset %d); onnxruntime vs torch max |diff| %.3g", path, opset,
                 worst[0])
    else:
        log.info("wrote %s (opset %d), not verified", path, opset)
    return path
