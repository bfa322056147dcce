"""Which layers a plan compresses: defaults, include/exclude patterns, per-layer overrides."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from gkpd.transposed_linear import conv1d_type, stored_transposed

# A pattern is a module type (nn.Conv2d), a type name ("Conv2d"), a module name ("layer1.0.conv1",
# or "layer1": the layers it holds) or a regular expression over names ("re:layer3\..*").
Pattern = type | str

SKIP = "skip"


def as_pattern_list(patterns: Pattern | Iterable[Pattern] | None, argument: str) -> list[Pattern]:
    if patterns is None:
        return []
    if isinstance(patterns, str | type):
        return [patterns]
    if not isinstance(patterns, Iterable):
        raise TypeError(f"{argument} must be a module type, a name, a 're:' regex or a list "
                        f"of them, got {patterns!r}")
    result = list(patterns)
    for p in result:
        if not isinstance(p, str | type):
            raise TypeError(
                f"{argument} entries must be module types, names or 're:' regexes, got {p!r}"
            )
    return result


def matches(pattern: Pattern, name: str, module: nn.Module) -> bool:
    """Whether module ``name`` (``module``) is one that ``pattern`` names: its type (a class,
    or the class's name; ``Conv1D`` or ``Linear`` for transformers' ``Conv1D``), its name or
    the name of a module holding it (``"rnn"`` names the gate layers ``rnn.l0.ih``,
    ``rnn.l0.hh``, ...), or a regex (``"re:..."``) its whole name matches."""
    # transformers' Conv1D is planned as the nn.Linear it computes: either type names it
    conv1d = stored_transposed(module)
    if isinstance(pattern, type):
        return isinstance(module, pattern) or (conv1d and pattern is conv1d_type())
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    types = (type(module).__name__, "Conv1D") if conv1d else (type(module).__name__,)
    return pattern == name or pattern in types or name.startswith(pattern + ".")


def check_patterns(patterns: list[Pattern], argument: str) -> None:
    for p in patterns:
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as error:
                raise ValueError(
                    f"{argument} pattern {p!r} is not a valid regex: {error}"
                ) from None


def tied_layers(model: nn.Module) -> dict[str, list[str]]:
    """Per module name, the other names its weight is reached by: modules holding the same
    weight parameter (tied input and output embeddings, ``lm_head.weight is
    embeddings.weight``) or the same module registered twice. Replacing the module at one
    name would untie them, so such layers stay dense."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")  # its own, not a child's
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return {
        name: [other for other in names if other != name]
        for names in owners.values() if len(names) > 1 for name in names
    }


def tied_reason(name: str, tied: Mapping[str, list[str]]) -> str | None:
    """Why layer ``name`` cannot be compressed on its own (``None``: it can)."""
    if name not in tied:
        return None
    return (f"its weight is tied to {', '.join(tied[name])}: compressing it would untie them "
            "(untie them first to compress)")


# the torch layers the methods replace; a subclass that computes something more stays dense
_TORCH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)


def own_forward_reason(module: nn.Module) -> str | None:
    """Why a subclass of a torch layer whose forward is its own (Gemma's scaled word
    embedding, a weight-standardised conv, a learned positional embedding that takes
    positions) cannot be replaced: a Kronecker layer computes the torch layer's function and
    would drop the rest without a word. ``None`` for torch's layers and plain subclasses."""
    cls = type(module)
    base = next((c for c in cls.__mro__ if c in _TORCH_LAYERS), None)
    if base is None or cls is base:
        return None
    for method in ("forward", "_conv_forward"):
        if getattr(cls, method, None) is not getattr(base, method, None):
            return (f"its class {cls.__name__} overrides {base.__name__}.{method}: a "
                    "replacement would compute the plain layer's function, not its own")
    return None


@dataclass
class Selection:
    """Per candidate layer name: ``None`` to compress it, else why it stays dense."""

    reasons: dict[str, str | None]
    overrides: dict[str, dict[str, Any]]


def select_layers(
    layers: Mapping[str, nn.Module],
    *,
    include: Pattern | Iterable[Pattern] | None,
    exclude: Pattern | Iterable[Pattern] | None,
    overrides: Mapping[str, Any] | None,
    first_layer: str | None,
    min_params: int,
) -> Selection:
    """Decide for each layer (conv, linear and embedding modules called by the example input,
    in call order).

    Defaults: the first conv on 1–4 input channels stays dense (little to gain, much to
    lose), and so do layers with fewer than ``min_params`` weights; a layer given settings by
    an override is compressed whatever the defaults say. Every include/exclude pattern and
    every override must name at least one layer. Override keys other than ``skip`` are the
    method's settings, checked by the method (``LayerContext.override``).
    """
    include_list = as_pattern_list(include, "include")
    exclude_list = as_pattern_list(exclude, "exclude")
    check_patterns(include_list, "include")
    check_patterns(exclude_list, "exclude")
    for argument, patterns in (("include", include_list), ("exclude", exclude_list)):
        for p in patterns:
            if not any(matches(p, n, m) for n, m in layers.items()):
                raise ValueError(
                    f"{argument} pattern {p!r} matches no conv, linear or embedding layer the "
                    "model calls: a pattern is such a layer's type (Linear), its name or a "
                    "parent's, or 're:' and a regex of its name "
                    f"(layers: {', '.join(list(layers)[:8])}{' ...' if len(layers) > 8 else ''})"
                )
    clean_overrides: dict[str, dict[str, Any]] = {}
    for name, value in (overrides or {}).items():
        if name not in layers:
            raise ValueError(f"overrides names layer {name!r}, which the model does not call")
        if value == SKIP or value is None:
            clean_overrides[name] = {SKIP: True}
            continue
        if not isinstance(value, Mapping):
            raise TypeError(
                f"overrides[{name!r}] must be 'skip' or a dict of the method's settings "
                f"(gkpd: a_shape/rank; svd, cp, tensor_train, tensor_ring: rank; tucker: "
                f"ranks), got {value!r}"
            )
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"overrides[{name!r}] keys must be setting names, got {bad!r}")
        if not isinstance(value.get(SKIP, False), bool):
            raise TypeError(
                f"overrides[{name!r}]['skip'] must be True or False, got {value[SKIP]!r}"
            )
        # the keys themselves are the method's to check (each takes its own settings)
        clean_overrides[name] = dict(value)

    reasons: dict[str, str | None] = {}
    for name, module in layers.items():
        override = clean_overrides.get(name, {})
        # settings given for a layer compress it even where the defaults would not
        forced = any(k != SKIP for k in override)
        if override.get(SKIP):
            reasons[name] = "skipped by override"
        elif include_list and not any(matches(p, name, module) for p in include_list):
            reasons[name] = "not included"
        elif any(matches(p, name, module) for p in exclude_list):
            reasons[name] = "excluded"
        elif forced:
            reasons[name] = None
        elif name == first_layer and getattr(module, "in_channels", 0) <= 4:
            reasons[name] = f"first layer on {module.in_channels} input channels"
        elif module.weight.numel() < min_params:
            reasons[name] = f"too small ({module.weight.numel()} < min_params {min_params})"
        else:
            reasons[name] = None
    return Selection(reasons, clean_overrides)
