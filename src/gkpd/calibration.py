"""Calibration data for data-aware planning: which inputs, how many, and the input-patch
covariances of a model's layers on them (:mod:`gkpd.whiten` holds the math)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gkpd.inputs import ModelCall, eval_mode
from gkpd.whiten import DEFAULT_DAMPING, InputCovariance, input_patches, input_width

__all__ = ["Calibration", "collect_covariances", "collect_cross_moments"]

_CHUNK = 64  # data given whole (a tensor, a dict) is fed to the model in batches of this size


@dataclass(frozen=True)
class Calibration:
    """A small sample of a model's inputs for data-aware GKPD (``gkpd.plan(...,
    calibration=...)``).

    ``data``: a batched tensor of inputs or a dict of batched keyword inputs (a tokenizer's
    output), or an iterable of batches (a ``DataLoader``). A batch is a tensor, a dict of
    keyword inputs, or an ``(inputs, targets…)`` tuple or list whose first element (a tensor
    or a dict) is used. At most ``samples`` inputs are used (``None``: all of them).
    ``damping``: added to each Kronecker factor of the covariance, as a fraction of its mean
    diagonal. ``sequential``: whiten each layer on the inputs that the already compressed
    layers before it produce, instead of the original model's. ``select``: rank factor shapes
    and ranks (and allocate the budget) by the output error on this data instead of the
    weight error. Off by default: that error comes from the Kronecker-factored covariance,
    which is a poor model of some splits' inputs, and on the Fashion-MNIST ResNet-32 at 5x the
    shapes it picked had a larger measured output error (summed 12.4 against 8.2) and 3x the
    MACs (benchmarks/RESULTS.md, data-aware GKPD).
    """

    data: Any
    samples: int | None = 512
    damping: float = DEFAULT_DAMPING
    sequential: bool = False
    select: bool = False
    # The covariances of the last model they were collected on: compress plans and applies on
    # a copy of one model, and collecting them twice would double the calibration cost.
    _last: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.data is None or isinstance(self.data, str | bytes):
            raise TypeError(
                "calibration data must be a tensor of inputs or an iterable of batches "
                f"(e.g. a DataLoader), got {type(self.data).__name__}"
            )
        if isinstance(self.data, Tensor) and (self.data.dim() == 0 or len(self.data) == 0):
            raise ValueError(
                f"calibration data is an empty tensor (shape {tuple(self.data.shape)})"
            )
        if self.samples is not None and (
            isinstance(self.samples, bool) or not isinstance(self.samples, int)
            or self.samples < 1
        ):
            raise ValueError(f"calibration samples must be a positive int or None, "
                             f"got {self.samples!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, numbers.Real) or not (
            self.damping >= 0
        ):
            raise ValueError(f"calibration damping must be a number >= 0, got {self.damping!r}")
        for name in ("sequential", "select"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"calibration {name} must be True or False, "
                                 f"got {getattr(self, name)!r}")

    @classmethod
    def of(cls, value: Any) -> Calibration | None:
        """``value`` as a :class:`Calibration` (``None`` stays ``None``)."""
        if value is None or isinstance(value, Calibration):
            return value
        return cls(value)

    def settings(self) -> dict[str, Any]:
        """What a plan records of this calibration (not the data)."""
        return {"samples": self.samples, "damping": float(self.damping),
                "sequential": self.sequential, "select": self.select}

    def batches(self) -> Iterator[ModelCall]:
        """The model call of each batch, ``samples`` inputs in all."""
        left = self.samples
        source: Iterable = self.data
        if isinstance(self.data, Tensor | Mapping):  # one batch of all inputs, fed in chunks
            whole = ModelCall.of(self.data, "calibration data")
            size = _batch_size(whole)
            source = (whole.rows(i, i + _CHUNK) for i in range(0, size, _CHUNK))
        for batch in source:
            if left is not None and left <= 0:
                return
            call = batch if isinstance(batch, ModelCall) else _as_call(batch)
            size = _batch_size(call)
            if left is not None and size > left:
                call, size = call.rows(0, left), left
            if left is not None:
                left -= size
            yield call


def _as_call(batch: Any) -> ModelCall:
    if isinstance(batch, Sequence) and not isinstance(batch, Tensor) and batch:
        batch = batch[0]  # (inputs, targets...)
    if isinstance(batch, Tensor | Mapping):
        return ModelCall.of(batch, "a calibration batch")
    raise TypeError(
        "a calibration batch must be a tensor, an (inputs, targets) pair or a dict of "
        f"keyword inputs, got {type(batch).__name__}"
    )


def _batch_size(call: ModelCall) -> int:
    for value in call.tensors():
        if value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("a calibration batch holds no batched tensor")


def _run(models: Sequence[nn.Module], calls: Iterable[ModelCall]) -> None:
    """Run every model of ``models`` on each of ``calls`` (calibration batches), in eval mode
    and without gradients."""
    device = next((p.device for p in models[0].parameters()), torch.device("cpu"))
    seen = 0
    with ExitStack() as modes, torch.no_grad():
        for model in models:
            modes.enter_context(eval_mode(model))
        for call in calls:
            call = call.to(device)
            for value in call.tensors():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError("calibration data holds NaN or inf values")
            for model in models:
                try:
                    call.run(model)
                except (RuntimeError, TypeError, ValueError, IndexError) as error:
                    if "calibration" in str(error):
                        raise
                    raise ValueError(
                        f"the model failed on a calibration batch ({call.describe()}): "
                        f"{error}"
                    ) from error
            seen += 1
    if seen == 0:
        raise ValueError("calibration data is empty: it yielded no batch")


def _fingerprint(model: nn.Module, names: Iterable[str]) -> tuple:
    """Identifies a model's values (a deep copy has the same) and the layers asked for."""
    state = tuple(
        (key, tuple(t.shape), float(t.double().sum()), float(t.double().square().sum()))
        for key, t in model.state_dict().items() if t.is_floating_point()
    )
    return type(model).__name__, tuple(names), state


def collect_covariances(
    model: nn.Module, modules: Mapping[str, nn.Module], calibration: Calibration
) -> dict[str, Tensor]:
    """The input-patch second moment (float64, CPU) of each of ``modules`` (by name) while
    ``model`` runs, in eval mode and without gradients, on ``calibration``'s inputs.

    The result is kept in ``calibration`` for the next call on a model with the same values
    and layers (a deep copy of it)."""
    key = _fingerprint(model, modules)
    if calibration._last.get("key") == key:
        return dict(calibration._last["covariances"])
    covariances = {name: InputCovariance(m) for name, m in modules.items()}

    def hook_for(name: str):
        def hook(_module, args):
            if args and isinstance(args[0], Tensor):
                covariances[name].update(args[0])

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in modules.items()]
    try:
        _run([model], calibration.batches())
    finally:
        for handle in handles:
            handle.remove()
    result = {name: cov.matrix for name, cov in covariances.items()}
    calibration._last.clear()
    calibration._last.update(key=key, covariances=result)
    return dict(result)


def collect_cross_moments(
    reference: nn.Module, reference_layer: nn.Module, model: nn.Module, layer: nn.Module,
    calibration: Calibration,
) -> tuple[Tensor, Tensor]:
    """``(E[x̃ x̃ᵀ], E[x x̃ᵀ])`` (float64) of ``layer``'s input patches ``x̃`` in ``model`` and
    the same layer's ``x`` in ``reference`` (the uncompressed model), on the same inputs."""
    captured: dict[str, Tensor] = {}

    def keep(key: str, module: nn.Module):
        def hook(_module, args):
            rows = input_patches(module, args[0].detach()).to("cpu", torch.float64)
            captured[key] = torch.cat([captured[key], rows]) if key in captured else rows

        return hook

    width = input_width(layer)
    own = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, width, dtype=torch.float64)
    count = 0
    handles = [reference_layer.register_forward_pre_hook(keep("x", reference_layer)),
               layer.register_forward_pre_hook(keep("y", layer))]
    try:
        for call in calibration.batches():
            captured.clear()
            _run([reference, model], [call])
            x, y = captured["x"], captured["y"]
            own += y.T @ y
            cross += x.T @ y
            count += y.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError("calibration data is empty: it yielded no batch")
    return own / count, cross / count
