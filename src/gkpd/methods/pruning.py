"""``prune``: structured channel pruning (a baseline), with torch-pruning's dependency graph.

Which channels. Only *inner* channels are pruned: the output channels of a conv/linear layer
whose coupling group (torch-pruning's dependency graph) reaches nothing but its own
normalization/activation, depthwise convolutions and the inputs of the layers that consume
it. Channels that meet another layer's output in a residual sum, pass through a pad, slice or
other channel-mixing op, or reach the model's output stay. For a ResNet that is the classic
choice of Li et al. 2017, "Pruning Filters for Efficient ConvNets": the outputs of ``conv1``
of every BasicBlock (``conv1``/``conv2`` of a Bottleneck) shrink, with the inputs of the next
conv; the stem, the block outputs and the classifier stay. This is deliberate: torch-pruning
traces the zero-padded option-A shortcut of the CIFAR ResNets (``F.pad`` on the channel axis)
as an element-wise op and would couple 16, 32 and 64 channels that do not correspond.

Importance. The L1 norm of each filter (``MagnitudeImportance(p=1)`` of the root layer only),
as Li et al.: data-free, needs no BatchNorm (so it also ranks layers without one) and no
sparsity training, which BN-scale ranking (Network Slimming) assumes. Ties keep the lower
index (stable sort), so a plan is deterministic.

Ratio. Every prunable layer loses (nearly) the same fraction of its output channels, at least
one kept: channels are removed one at a time, each from the layer with the largest kept
fraction, and the number of removals is found by bisection so the whole model (every
parameter counted, as :func:`gkpd.counting.module_params`) comes closest to the target
ratio; each step prunes a deep copy and counts it. The plan records, per pruned layer, the
removed output-channel indices; :meth:`Prune.apply_model` replays them through a fresh
dependency graph, so applying (or loading, ``decompose=False``) gives the same architecture
every time.

torch-pruning is the optional extra ``gkpd[baselines]``; it is imported only when used.

One module of ~430 lines on purpose: planning and replaying share the dependency-graph
helpers below, and neither is used without the other.
"""

from __future__ import annotations

import copy
import heapq
import logging
import math
from typing import Any

import torch
from torch import nn

from gkpd.counting import module_params
from gkpd.inputs import ModelCall, eval_mode, output_tensors
from gkpd.methods.base import ModelMethod
from gkpd.plan.budget import check_tolerance, unreachable
from gkpd.plan.schema import CompressionPlan, LayerPlan
from gkpd.plan.select import select_layers
from gkpd.plan.trace import dense_entry, pattern_names, trace_layers

log = logging.getLogger(__name__)

_INSTALL = "method 'prune' needs torch-pruning: pip install 'gkpd[baselines]'"
# torch-pruning op types whose channel mapping a group must not pass through
_UNSAFE_OPS = ("SLICE", "EXPAND", "UNBIND", "CUSTOMIZED", "PARAMETER", "MHA", "LSTM", "EMBED")


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:
        raise ImportError(_INSTALL) from error
    return torch_pruning


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _is_depthwise(module: nn.Module) -> bool:
    return (
        _is_conv(module)
        and module.groups > 1
        and module.groups == module.out_channels == module.in_channels
    )


def _example_call(example_input: Any) -> ModelCall:
    call = ModelCall.of(example_input)
    if not all(isinstance(v, torch.Tensor) for v in (*call.args, *call.kwargs.values())):
        raise TypeError(
            "example_input must be a tensor, a tuple of tensors or a dict of tensors for "
            f"method 'prune', got {call.describe()}"
        )
    return call


class _Graph:
    """A dependency graph of ``model`` (traced in eval mode, modes and BN statistics kept)."""

    def __init__(self, tp, model: nn.Module, call: ModelCall) -> None:
        self.tp, self.model = tp, model
        frozen = [p for p in model.parameters() if not p.requires_grad]
        try:
            for p in frozen:
                p.requires_grad_(True)
            with eval_mode(model), torch.enable_grad():
                self.graph = tp.DependencyGraph().build_dependency(
                    model,
                    example_inputs=call, forward_fn=lambda m, c: c.run(m),
                    output_transform=output_tensors, verbose=False,
                )
        except Exception as error:  # raised deep inside torch-pruning's graph code
            raise ValueError(
                f"method 'prune' cannot prune this {type(model).__name__}: Torch-Pruning "
                f"{getattr(tp, '__version__', '')} failed to build its dependency graph "
                f"({type(error).__name__}: {error}). The layer methods (gkpd, svd, "
                "tensor_train, ...) need no such graph"
            ) from error
        finally:
            for p in frozen:
                p.requires_grad_(False)
        self.names = {m: n for n, m in model.named_modules()}

    def group(self, module: nn.Module, idxs: list[int]):
        fn = (
            self.tp.prune_conv_out_channels
            if _is_conv(module)
            else self.tp.prune_linear_out_channels
        )
        return self.graph.get_pruning_group(module, fn, idxs)

    def why_not(self, module: nn.Module) -> str | None:
        """``None`` when the output channels of ``module`` are inner channels, else why not."""
        if not (_is_conv(module) or isinstance(module, nn.Linear)):
            return "not a conv or linear layer"
        if _is_conv(module) and module.groups > 1:
            return "grouped/depthwise layer (pruned, if at all, with the layer before it)"
        out = module.weight.shape[0]
        if out < 2:
            return "a single output channel"
        for item in self.group(module, [0]).items:
            node, handler = item.dep.target, item.dep.handler
            target = node.module
            outgoing = self.graph.is_out_channel_pruning_fn(handler)
            if target is module:
                if not node.outputs:
                    return "its outputs are the model's output"
                continue
            if _is_conv(target) and target.groups > 1 and not _is_depthwise(target):
                return f"coupled to the grouped convolution {self.names.get(target, '?')}"
            if (
                outgoing
                and (isinstance(target, nn.Linear) or _is_conv(target))
                and not _is_depthwise(target)
            ):
                return (
                    f"output channels coupled to {self.names.get(target, '?')} "
                    "(a residual sum or shared channels)"
                )
            if node.type.name in _UNSAFE_OPS:
                return f"its channels pass through a {node.type.name.lower()} op"
            if node.type.name == "ELEMENTWISE" and (
                len(node.inputs) > 1 or "Pad" in getattr(node, "name", "")
            ):
                return "its channels meet another branch or a pad (residual/shortcut)"
            if outgoing and not node.outputs:
                return "its channels reach the model's output"
        return None


def _eval_forward(model: nn.Module, call: ModelCall):
    """``model`` run on ``call`` in eval mode without gradients; every module's mode is
    restored."""
    with eval_mode(model), torch.no_grad():
        return call.run(model)


def _schedule(sizes: list[int]) -> list[tuple[int, ...]]:
    """Kept channels per root after 0, 1, 2, ... removals: each removal takes one channel
    from the root with the largest kept fraction (the earliest on ties), down to one each,
    so every layer keeps nearly the same fraction and each step is as small as possible."""
    keeps = list(sizes)
    heap = [(-1.0, i) for i, n in enumerate(sizes) if n > 1]
    heapq.heapify(heap)
    result = [tuple(keeps)]
    while heap:
        _, i = heapq.heappop(heap)
        keeps[i] -= 1
        result.append(tuple(keeps))
        if keeps[i] > 1:
            heapq.heappush(heap, (-keeps[i] / sizes[i], i))
    return result


def _removed(tp_group, names: dict) -> dict[str, dict[str, list[int]]]:
    """Per named conv/linear in the group: the removed ``out``/``in`` channel indices."""
    result: dict[str, dict[str, list[int]]] = {}
    for item in tp_group.items:
        target = item.dep.target.module
        if not (_is_conv(target) or isinstance(target, nn.Linear)) or target not in names:
            continue
        side = "out" if "out_channels" in getattr(item.dep.handler, "__name__", "") else "in"
        result.setdefault(names[target], {})[side] = sorted(int(i) for i in item.idxs)
    return result


def _energy(w: torch.Tensor) -> float:
    """Σ w², exactly rounded: a threaded torch sum can differ in the last bit between calls
    (it depends on the tensor's memory alignment), and plans must be reproducible."""
    return math.fsum(w.square().flatten().tolist())


def _relative_error(module: nn.Module, removed: dict[str, list[int]]) -> float:
    w = module.weight.detach().double()
    total = _energy(w)
    if not total:
        return 0.0
    keep_out = torch.ones(w.shape[0], dtype=torch.bool)
    keep_out[removed.get("out", [])] = False
    keep_in = torch.ones(w.shape[1], dtype=torch.bool)
    if removed.get("in") and not _is_depthwise(module):
        keep_in[[i for i in removed["in"] if i < w.shape[1]]] = False
    kept = _energy(w[keep_out][:, keep_in])
    return math.sqrt(max(total - kept, 0.0) / total)


class Prune(ModelMethod):
    """Whole-model structured pruning; see the module docstring."""

    name = "prune"

    # ------------------------------------------------------------------ planning

    def plan_model(
        self, model: nn.Module, example_input: Any, *, ratio: float, strategy: str = "uniform",
        include=None, exclude=None, overrides=None, min_params: int = 1024,
        tolerance: float = 0.03,
    ) -> CompressionPlan:
        """Pure: prunes deep copies only. See :func:`gkpd.plan` for the arguments."""
        tp = _torch_pruning()
        if strategy != "uniform":
            raise ValueError(f"method 'prune' supports strategy 'uniform' only, got {strategy!r}")
        for name, value in (overrides or {}).items():
            if value not in ("skip", None):
                raise ValueError(
                    f"overrides[{name!r}] must be 'skip' for method 'prune', got {value!r}"
                )
        example = _example_call(example_input)
        calls = trace_layers(model, example)
        if not calls:
            raise ValueError("the model calls no conv or linear layer on example_input")
        first_conv = next((n for n, c in calls.items() if _is_conv(c.module)), None)
        selection = select_layers(
            {n: c.module for n, c in calls.items()}, include=include, exclude=exclude,
            overrides=overrides, first_layer=first_conv, min_params=min_params,
        )
        graph = _Graph(tp, copy.deepcopy(model), example)
        work_modules = dict(graph.model.named_modules())
        imp = tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None)
        reasons: dict[str, str] = {}
        order: dict[str, list[int]] = {}  # root -> channels, least important first
        for name in calls:
            module = work_modules[name]
            reason = selection.reasons[name] or graph.why_not(module)
            if reason:
                reasons[name] = reason
                continue
            n = module.weight.shape[0]
            scores = imp(graph.group(module, list(range(n)))).detach().cpu()
            order[name] = torch.argsort(scores, stable=True).tolist()
        if not order:
            raise ValueError(
                "no layer's output channels can be pruned: "
                + "; ".join(f"{n}: {r}" for n, r in reasons.items())
            )

        dense_total = module_params(model)
        totals: dict[tuple[int, ...], int] = {}
        schedule = _schedule([len(o) for o in order.values()])

        def prune_at(k: int):
            """The model after the first ``k`` removals of the schedule, and per changed
            layer what was removed."""
            g = _Graph(tp, copy.deepcopy(model), example)
            mods = dict(g.model.named_modules())
            removed: dict[str, dict[str, list]] = {}
            for (name, o), keep in zip(order.items(), schedule[k], strict=True):
                if keep == len(o):
                    continue
                group = g.group(mods[name], sorted(o[: len(o) - keep]))
                for layer, sides in _removed(group, g.names).items():
                    record = removed.setdefault(layer, {"roots": []})
                    for side, idxs in sides.items():
                        record.setdefault(side, []).extend(idxs)
                    record["roots"].append(name)
                group.prune()
            return g.model, removed

        def total_at(k: int) -> int:
            keeps = schedule[k]
            if keeps not in totals:
                totals[keeps] = module_params(prune_at(k)[0])
            return totals[keeps]

        last = len(schedule) - 1
        largest = total_at(last)
        if dense_total / largest < ratio * (1 - tolerance):
            why = "by pruning the inner channels (the others are coupled)"
            raise unreachable(ratio, dense_total, largest, why)
        lo, hi = 0, last  # smallest k whose ratio reaches the target: ratio(lo) < target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if dense_total / total_at(mid) < ratio:
                lo = mid
            else:
                hi = mid
        k = min((lo, hi), key=lambda q: abs(dense_total / total_at(q) - ratio))
        total = total_at(k)
        check_tolerance(total, dense_total, ratio, tolerance)
        pruned, removed = prune_at(k)
        p = k / sum(len(o) for o in order.values())
        self._check_forward(model, pruned, example)
        options = {
            "importance": "l1", "channels": "inner", "fraction": p, "min_params": min_params,
            "tolerance": tolerance, "include": pattern_names(include, "include"),
            "exclude": pattern_names(exclude, "exclude"),
            # apply_model traces the dependency graph again on zeros of these (the last ones
            # are the keyword inputs named in input_keywords, where there are any)
            "input_shapes": [list(t.shape) for t in example.tensors()],
            "input_dtypes": [str(t.dtype).removeprefix("torch.") for t in example.tensors()],
            **({"input_keywords": list(example.kwargs)} if example.kwargs else {}),
        }
        layers = self._layers(calls, pruned, removed, reasons, set(order), example)
        result = CompressionPlan(
            model_type=type(model).__name__, method=self.name, target_ratio=float(ratio),
            strategy="uniform", objective="l1", dense_params=dense_total, params=total,
            dense_macs=sum(e.dense_macs for e in layers), macs=sum(e.macs for e in layers),
            layers=layers, options=options,
        )
        log.info("prune plan: %d layers changed, %.0f%% of inner channels removed, ratio %.2f",
                 len(result.compressed_layers), 100 * p, result.achieved_ratio)
        return result

    @staticmethod
    def _check_forward(dense: nn.Module, pruned: nn.Module, example: ModelCall) -> None:
        want = [tuple(t.shape) for t in output_tensors(_eval_forward(dense, example))]
        try:
            got = [tuple(t.shape) for t in output_tensors(_eval_forward(pruned, example))]
        except RuntimeError as error:
            raise ValueError(f"the pruned model fails on example_input: {error}") from error
        if got != want:
            raise ValueError(
                f"the pruned model's outputs have shapes {got}, the dense model's {want}: its "
                "channel couplings were not traced correctly"
            )

    def _layers(self, calls, pruned, removed, reasons, roots, example) -> list[LayerPlan]:
        pruned_calls = trace_layers(pruned, example)
        layers = []
        for name, call in calls.items():
            entry = dense_entry(
                name, call, reason=reasons.get(name, "kept: no channel removed at this ratio")
            )
            module = call.module
            change = removed.get(name)
            if change:
                after = pruned_calls[name]
                entry.method = self.name
                entry.params = module_params(after.module)
                entry.macs = after.dense_macs()
                entry.relative_error = _relative_error(module, change)
                is_root = name in roots and name in change["roots"]
                coupled = sorted({r for r in change["roots"] if r != name})
                entry.settings = {
                    "root": is_root,
                    "out_channels_removed": sorted(set(change.get("out", []))),
                    "in_channels_removed": sorted(set(change.get("in", []))),
                    "coupled_to": coupled,
                }
                entry.reason = "output channels pruned"
                if not is_root:
                    entry.reason = f"channels pruned with {', '.join(coupled)}"
                    if name in reasons:
                        entry.reason += f"; own outputs kept: {reasons[name]}"
            layers.append(entry)
        return layers

    # ------------------------------------------------------------------ applying

    def apply_model(self, model: nn.Module, plan: CompressionPlan, *, decompose: bool = True):
        """Remove, in place, the channels ``plan`` records (the surviving weights are kept;
        with ``decompose=False`` they are about to be overwritten by ``load_state_dict``
        anyway). Returns ``model``."""
        tp = _torch_pruning()
        shapes = plan.options.get("input_shapes")
        dtypes = plan.options.get("input_dtypes") or ["float32"] * len(shapes or [])
        if not isinstance(shapes, list) or not shapes:
            raise ValueError("a 'prune' plan needs options['input_shapes'] (the example input)")
        param = next(model.parameters(), None)
        device = param.device if param is not None else None
        keywords = plan.options.get("input_keywords") or []
        try:
            zeros = [
                torch.zeros(tuple(s), dtype=getattr(torch, d), device=device)
                for s, d in zip(shapes, dtypes, strict=True)
            ]
            if len(keywords) > len(zeros) or not all(isinstance(k, str) for k in keywords):
                raise ValueError(f"input_keywords {keywords!r:.200} do not name the last inputs")
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(
                f"plan options input_shapes/input_dtypes/input_keywords are invalid: {error}"
            ) from error
        positional = len(zeros) - len(keywords)
        example = ModelCall(
            tuple(zeros[:positional]), dict(zip(keywords, zeros[positional:], strict=True))
        )
        roots = []  # every entry is checked before the model is changed
        for entry in plan.compressed_layers:
            if not entry.settings.get("root"):
                continue
            module = model.get_submodule(entry.name)
            idxs = entry.settings.get("out_channels_removed")
            n = module.weight.shape[0]
            if (
                not isinstance(idxs, list)
                or not all(isinstance(i, int) and 0 <= i < n for i in idxs)
                or len(set(idxs)) != len(idxs)
                or len(idxs) >= n
            ):
                raise ValueError(
                    f"plan layer {entry.name!r}: out_channels_removed must be distinct channel "
                    f"indices in [0, {n}) leaving at least one, got {idxs!r:.200}"
                )
            roots.append((module, idxs))
        graph = _Graph(tp, model, example)
        for module, idxs in roots:
            graph.group(module, idxs).prune()
        got = module_params(model)
        if got != plan.params:
            raise ValueError(
                f"replaying the 'prune' plan left {got:,} parameters, the plan says "
                f"{plan.params:,} (was it made for this architecture?)"
            )
        return model


__all__ = ["Prune"]
