"""``summary(model, example_input)``: per-layer parameters and MACs as a table or JSON.

Built on :func:`gkpd.counting.count_model` (one forward pass with hooks), so what is reported
for a Kronecker layer is the path it runs at the example input's size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from gkpd.counting import count_model
from gkpd.deprecation import renamed
from gkpd.inputs import ModelCall
from gkpd.text_table import format_table

__all__ = ["LayerSummary", "Report", "summary"]


@dataclass
class LayerSummary:
    """One conv, linear or Kronecker layer, in the order the forward pass calls it."""

    name: str
    type: str
    params: int
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    path: str | None = None  # what a Kronecker layer runs (gkpd.layers.base)
    calls: int = 1

    order = renamed("order", "path")

    @property
    def kronecker(self) -> bool:
        return self.type.startswith("Kronecker")


@dataclass
class Report:
    """Per-layer counts and whole-model totals of one model at one input size.

    ``total_params`` counts every parameter of the model (BatchNorm, embeddings, ...), not
    only the listed layers; ``total_macs`` sums the listed layers' MACs for the whole
    ``example_input`` (its batch included).
    """

    model_type: str
    input_shape: tuple[int, ...]
    layers: list[LayerSummary] = field(default_factory=list)
    total_params: int = 0

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def layer_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def kronecker_layers(self) -> list[LayerSummary]:
        return [layer for layer in self.layers if layer.kronecker]

    def __getitem__(self, name: str) -> LayerSummary:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"report has no layer named {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (shapes as lists)."""
        data = asdict(self)
        for layer in data["layers"]:
            layer["input_shape"] = list(layer["input_shape"])
            layer["output_shape"] = list(layer["output_shape"])
        data["input_shape"] = list(self.input_shape)
        data["total_macs"] = self.total_macs
        data["layer_params"] = self.layer_params
        data["kronecker_layers"] = len(self.kronecker_layers)
        return data

    def table(self) -> str:
        header = ("#", "layer", "type", "input", "path", "params", "MACs")
        rows = [header]
        for i, layer in enumerate(self.layers):
            rows.append(
                (
                    str(i),
                    layer.name,
                    layer.type,
                    "×".join(map(str, layer.input_shape)),
                    layer.path or "-",
                    f"{layer.params:,}",
                    f"{layer.macs:,}" + (f" ({layer.calls} calls)" if layer.calls > 1 else ""),
                )
            )
        footer = (
            f"{self.model_type} at input {'×'.join(map(str, self.input_shape))}: "
            f"{self.total_params:,} parameters in total ({self.layer_params:,} in the "
            f"{len(self.layers)} layers above, {len(self.kronecker_layers)} of them Kronecker); "
            f"{self.total_macs:,} MACs"
        )
        return format_table(rows, footer, right={0, 5, 6})

    def __str__(self) -> str:
        return self.table()


def summary(model: nn.Module, example_input: object) -> Report:
    """Run ``model`` once on ``example_input`` (eval mode, no gradients; the model's mode is
    restored) and report every conv, linear and Kronecker layer it calls: name, type,
    parameters, MACs, input shape and, for Kronecker layers, the path that runs.
    ``example_input``: a tensor, a tuple of positional or a dict of keyword inputs; the
    report's ``input_shape`` is its first tensor's."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    call = ModelCall.of(example_input)
    counts = count_model(model, call)
    layers = [
        LayerSummary(
            name=c.name,
            type=c.kind,
            params=c.params,
            macs=c.macs,
            input_shape=tuple(c.input_shape),
            output_shape=tuple(c.output_shape),
            path=c.path,
            calls=c.calls,
        )
        for c in counts.layers
    ]
    return Report(
        model_type=type(model).__name__,
        input_shape=call.shape,
        layers=layers,
        total_params=counts.total_params,
    )
