"""``CompressionPlan``: what to do to each layer, serializable and readable."""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gkpd.text_table import format_table

# Version 2 keeps GKPD's factor shapes, rank and path in the layer's ``settings`` like every
# other method's; version 1 had them as fields of the layer (the path as ``order``), and
# gained ``attention_macs``, ``notes`` and ``options["layout"]`` late (a version 1 file may
# lack them).
PLAN_VERSION = 2
_READABLE_VERSIONS = (1, PLAN_VERSION)
# The layer fields of version 1 and the settings they are in version 2 (all None on a dense
# layer).
_V1_FIELDS = {"a_shape": "a_shape", "b_shape": "b_shape", "rank": "rank", "order": "path"}

# Settings that are the same for every layer of a plan say nothing in a per-layer table.
_QUIET_SETTINGS = frozenset({"iterations", "seed", "damping", "latency_batch"})


def _settings_text(settings: dict[str, Any]) -> str:
    """A method's settings in a few characters: ``a_shape=4×4×3×1 ranks=4,8``."""
    parts = []
    for key, value in settings.items():
        if key in _QUIET_SETTINGS:
            continue
        if isinstance(value, list | tuple):
            value = ("×" if key.endswith("_shape") else ",").join(map(str, value))
        parts.append(f"{key}={value}")
    return " ".join(parts) or "-"


def _as_setting(value: Any) -> Any:
    """A setting as JSON reads it back (tuples as lists), so a plan equals its reload."""
    return list(value) if isinstance(value, tuple) else value


def _deprecated_setting(field_name: str) -> property:
    """``LayerPlan.<field_name>``, a field of GKPD layers in plan version 1, now read from and
    written to their settings with a ``DeprecationWarning``."""
    key = _V1_FIELDS[field_name]

    def warn() -> None:
        warnings.warn(f"LayerPlan.{field_name} is deprecated: use LayerPlan.settings[{key!r}]",
                      DeprecationWarning, stacklevel=3)

    def get(self: LayerPlan) -> Any:
        warn()
        value = self.settings.get(key)
        return tuple(value) if isinstance(value, list) else value

    def put(self: LayerPlan, value: Any) -> None:
        warn()
        if value is None:
            self.settings.pop(key, None)
        else:
            self.settings[key] = _as_setting(value)

    return property(get, put, doc=f"Deprecated: ``settings.get({key!r})``.")


@dataclass
class LayerPlan:
    """One conv/linear layer: its dense facts and, when compressed, the chosen configuration.

    ``method`` is ``"dense"`` for a layer left as it is (``reason`` says why); a compressed
    layer's ``settings`` are its method's (GKPD: ``a_shape``, ``b_shape``, ``rank`` and
    ``path``, see :class:`gkpd.methods.KroneckerConfig`), JSON values only. ``macs`` are per
    sample at the input size seen by the planner (``input_shape``, batch dimension included
    as seen). ``a_shape``, ``b_shape``, ``rank`` and ``order`` (the path) still work as
    deprecated attributes and constructor keywords, reading and writing ``settings``.
    """

    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    dense_params: int
    dense_macs: int
    method: str = "dense"
    params: int = 0
    macs: int = 0
    relative_error: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    a_shape = _deprecated_setting("a_shape")
    b_shape = _deprecated_setting("b_shape")
    rank = _deprecated_setting("rank")
    order = _deprecated_setting("order")

    @property
    def compressed(self) -> bool:
        return self.method != "dense"

    @classmethod
    def from_dict(cls, data: dict[str, Any], version: int = PLAN_VERSION) -> LayerPlan:
        """A layer as a plan file of ``version`` holds it."""
        if not isinstance(data, dict):
            raise ValueError(f"plan layer is not a JSON object: {data!r:.100}")
        if not isinstance(data.get("settings", {}), dict):
            raise ValueError(f"plan layer settings must be an object, got {data['settings']!r}")
        values = _layer_from_v1(data) if version == 1 else dict(data)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"plan layer has unknown fields {sorted(unknown)}")
        for key in ("weight_shape", "input_shape"):
            if values.get(key) is not None:
                values[key] = tuple(int(v) for v in values[key])
        return cls(**values)


def _accept_v1_fields(init: Callable[..., None]) -> Callable[..., None]:
    """``LayerPlan(..., a_shape=..., rank=...)`` as before version 2: the values go into
    ``settings`` (a ``DeprecationWarning``)."""

    @functools.wraps(init)
    def __init__(self: LayerPlan, *args: Any, **kwargs: Any) -> None:
        moved = {k: kwargs.pop(k) for k in _V1_FIELDS if k in kwargs}
        init(self, *args, **kwargs)
        if moved:
            warnings.warn(
                f"LayerPlan({', '.join(f'{k}=' for k in moved)}...) is deprecated: pass "
                "settings={...} instead", DeprecationWarning, stacklevel=2,
            )
            self.settings = {_V1_FIELDS[k]: _as_setting(v) for k, v in moved.items()
                             if v is not None} | self.settings

    return __init__


LayerPlan.__init__ = _accept_v1_fields(LayerPlan.__init__)


def _layer_from_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 layer with its GKPD fields moved into its settings (where the settings
    already hold one, as svd's ``rank``, the settings' value stays)."""
    values = {k: v for k, v in data.items() if k not in _V1_FIELDS}
    moved = {key: data[k] for k, key in _V1_FIELDS.items() if data.get(k) is not None}
    values["settings"] = moved | values.get("settings", {})
    return values


@dataclass
class CompressionPlan:
    """Per-layer decisions for a whole model, and the totals they add up to.

    ``dense_params``/``params`` count every parameter of the model (BatchNorm, layers left
    dense, ...), so ``achieved_ratio`` is the whole-model ratio of docs/design.md §6.
    ``dense_macs``/``macs`` (per sample) add to the layers' the ``attention_macs`` of the
    attention products, which no layer holds and compression leaves as they are. ``notes``
    say, in words, what the user should know about the plan (parameters no method
    compresses, layers that keep little of their weight).
    """

    model_type: str
    method: str
    target_ratio: float
    strategy: str
    objective: str
    dense_params: int
    params: int
    dense_macs: int
    macs: int
    layers: list[LayerPlan]
    options: dict[str, Any] = field(default_factory=dict)
    attention_macs: int = 0
    notes: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def achieved_ratio(self) -> float:
        return self.dense_params / self.params

    @property
    def mac_ratio(self) -> float:
        return self.dense_macs / self.macs if self.macs else float("inf")

    def layer(self, name: str) -> LayerPlan:
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(f"plan has no layer named {name!r}")

    @property
    def layout(self) -> str:
        """The memory layout the compressed model runs in (:func:`gkpd.layout.run_in_layout`):
        what planning timed fastest or was asked for (``gkpd.plan(..., layout=...)``);
        ``"contiguous"`` where there was no choice (no 4-d or 5-d layer input, ``prune``). A
        latency plan made before layouts were chosen says ``latency_channels_last`` instead."""
        if "layout" in self.options:
            return self.options["layout"]
        return "channels_last" if self.options.get("latency_channels_last") else "contiguous"

    def latency_speedup(self) -> float | None:
        """The compressed model's speed over the dense one's in its fastest layout, as
        planning measured them when it chose the layout (``options["model_latency"]``);
        ``None`` where it chose none."""
        timed = self.options.get("model_latency")
        if not timed:
            return None
        return min(timed["dense_ms"].values()) / timed["ms"][self.layout]

    @property
    def compressed_layers(self) -> list[LayerPlan]:
        return [entry for entry in self.layers if entry.compressed]

    def totals(self) -> dict[str, Any]:
        """The plan's method, strategy and totals, as a model card and ``gkpd compress
        --json`` report them."""
        return {
            "method": self.method,
            "strategy": self.strategy,
            "target_ratio": self.target_ratio,
            "achieved_ratio": self.achieved_ratio,
            "dense_params": self.dense_params,
            "params": self.params,
            "dense_macs": self.dense_macs,
            "macs": self.macs,
            "attention_macs": self.attention_macs,
            "compressed_layers": len(self.compressed_layers),
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["achieved_ratio"] = self.achieved_ratio
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> CompressionPlan:
        if not isinstance(data, dict):
            raise ValueError(f"{source} is not a JSON object")
        version = data.get("version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(
                f"{source} has plan version {version!r}; this gkpd reads versions "
                f"{', '.join(map(str, _READABLE_VERSIONS))}"
            )
        values = {k: v for k, v in data.items() if k != "achieved_ratio"}
        values["version"] = PLAN_VERSION  # read as the current version: saved as one
        try:
            values["layers"] = [LayerPlan.from_dict(layer, version) for layer in values["layers"]]
            return cls(**values)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{source} is not a valid compression plan: {error}") from error

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> CompressionPlan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is truncated or not JSON: {error}") from error
        return cls.from_dict(data, source)

    def save(self, path: str | Path) -> Path:
        from gkpd.files import atomic_write_text

        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CompressionPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plan file {path} does not exist")
        return cls.from_json(path.read_text(encoding="utf-8"), str(path))

    # ------------------------------------------------------------------ table

    def table(self) -> str:
        rows = [("layer", "method", "settings", "params", "dense", "MACs", "dense MACs", "rel.err",
                 "note")]
        for e in self.layers:
            rows.append((
                e.name, e.method, _settings_text(e.settings),
                f"{e.params:,}", f"{e.dense_params:,}", f"{e.macs:,}", f"{e.dense_macs:,}",
                f"{e.relative_error:.4f}" if e.compressed else "-", e.reason,
            ))
        strategy = self.strategy + (
            " (uniform missed the ratio)" if "uniform_error" in self.options else ""
        )
        footer = (
            f"{self.model_type} / {self.method} / {strategy}: params "
            f"{self.dense_params:,} -> {self.params:,} ({self.achieved_ratio:.2f}x, target "
            f"{self.target_ratio:g}x); MACs {self.dense_macs:,} -> {self.macs:,} "
            f"({self.mac_ratio:.2f}x"
            + (f"; {self.attention_macs:,} of each in attention products" if self.attention_macs
               else "")
            + ")"
        )
        speedup = self.latency_speedup()
        if speedup is not None:
            timed = self.options["model_latency"]
            dense_layout = min(timed["dense_ms"], key=timed["dense_ms"].get)
            footer += (
                f"\nlatency at batch {timed['batch']}: {timed['ms'][self.layout]:.3g} ms in "
                f"{self.layout}, dense {timed['dense_ms'][dense_layout]:.3g} ms in "
                f"{dense_layout} ({speedup:.2f}x)"
            )
        table = format_table(rows, footer, right={3, 4, 5, 6, 7})
        return "\n".join([table, *(f"note: {note}" for note in self.notes)])

    def __str__(self) -> str:
        return self.table()
