"""What a plan leaves as it is, in words: the parameters outside every planned layer, layers
that keep little of their weight, and, for a ratio out of reach, what holds the rest and
which options (in ``gkpd.plan`` and ``gkpd compress``) would change it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from gkpd.plan.schema import LayerPlan

# A compressed layer whose relative error is at least this keeps little of its weight
# (under a fifth of its energy): it is flagged in the plan.
WEAK_ERROR = 0.9


@dataclass(frozen=True)
class Holder:
    """A module holding parameters that no plan entry covers, and the methods that report
    they could compress it (``LayerMethod.supports``)."""

    name: str
    type: str
    params: int
    methods: tuple[str, ...]


def unplanned_parameters(model: nn.Module, planned: Iterable[str], methods) -> list[Holder]:
    """The modules of ``model`` that hold parameters of their own outside the modules named
    ``planned``, with the names of the ``methods`` (layer methods) that could take them.
    Shared parameters count once."""
    modules = dict(model.named_modules())
    seen = {id(p) for name in planned for p in modules[name].parameters()}
    holders = []
    for name, module in modules.items():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own:
            takers = tuple(m.name for m in methods if m.supports(module) is None)
            holders.append(Holder(name, type(module).__name__, sum(p.numel() for p in own),
                                  takers))
    return holders


def _share(count: int, total: int) -> str:
    return f"{count:,} ({100 * count / total:.1f}%)"


def _named(one: str, many: str, names: Sequence[str]) -> str:
    """``Embedding 'embed'`` or ``31 BatchNorm2d ('bn1', 'layer1.0.bn1', 'layer1.0.bn2', ...)``."""
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{one} {shown}" if len(names) == 1 else f"{len(names)} {many} ({shown})"


def describe_holders(holders: Sequence[Holder], total: int) -> str:
    """``holders`` grouped by type, largest first: ``51,200 (4.1%) in Embedding 'embed'``."""
    groups: dict[str, list[Holder]] = {}
    for holder in holders:
        groups.setdefault(holder.type, []).append(holder)
    ordered = sorted(groups.items(), key=lambda kv: -sum(h.params for h in kv[1]))
    return "; ".join(
        f"{_share(sum(h.params for h in group), total)} in "
        f"{_named(kind, kind, [h.name for h in group])}"
        for kind, group in ordered
    )


def holder_notes(holders: Sequence[Holder], total: int) -> list[str]:
    """The plan's notes on the parameters outside every planned layer."""
    notes = []
    none = [h for h in holders if not h.methods]
    if none:
        notes.append(f"parameters no method compresses: {describe_holders(none, total)}")
    uncalled = [h for h in holders if h.methods]
    if uncalled:
        notes.append(
            "not planned, as the forward pass on example_input does not call them (a parent "
            f"reads their weights, or they are unused): {describe_holders(uncalled, total)}"
        )
    return notes


def weak_layers(entries: Iterable[LayerPlan]) -> list[LayerPlan]:
    """Compressed layers whose relative error is at least :data:`WEAK_ERROR`."""
    return [e for e in entries if e.compressed and e.relative_error >= WEAK_ERROR]


def weak_note(weak: Sequence[LayerPlan]) -> str:
    shown = ", ".join(
        f"{e.name} (rank {e.settings['rank']}, {e.relative_error:.3f})" if "rank" in e.settings
        else f"{e.name} ({e.relative_error:.3f})"
        for e in weak
    )
    return (
        f"{len(weak)} compressed layer(s) keep little of their weight (relative error >= "
        f"{WEAK_ERROR}): {shown}; ask for a smaller ratio, or keep such layers dense with "
        f"max_layer_error={WEAK_ERROR} (--max-layer-error) or exclude= (--exclude) and let the "
        "other layers take the budget"
    )


# Why a layer stayed dense (the start of its plan entry's reason), and what changes it: the
# keyword of gkpd.plan / the flag of gkpd compress, or the keyword alone where no flag has it.
_ADVICE = (
    ("too small", "lower min_params= / --min-params below their weight counts"),
    ("not included", "include them: include= / --include"),
    ("excluded", "drop them from exclude= / --exclude"),
    ("skipped by override", "drop them from overrides= (gkpd.plan only)"),
    ("first layer", "give them settings in overrides= (gkpd.plan only)"),
    ("no configuration", "allow_more_macs=True / --allow-more-macs, or a lower "
                         "min_layer_ratio= (gkpd.plan only)"),
)


def unreachable_message(
    base: str, best: float, entries: Mapping[str, LayerPlan], modules: Mapping[str, nn.Module],
    holders: Sequence[Holder], total: int, method: str, methods,
) -> str:
    """``base`` (what the strategy found) with where the parameters sit that the plan cannot
    shrink and what would change each part: the options of ``gkpd.plan`` (and of
    ``gkpd compress``, in parentheses), or the methods that report they can take the layers
    ``method`` cannot. ``modules``: the traced layers by name."""
    parts = [f"{base}."]
    parts.extend(f"{note[0].upper()}{note[1:]}." for note in holder_notes(holders, total))
    groups: dict[str, list[LayerPlan]] = {}
    for entry in entries.values():
        if entry.reason:
            key = next((k for k, _ in _ADVICE if entry.reason.startswith(k)), entry.reason)
            groups.setdefault(key, []).append(entry)
    for key, group in groups.items():
        advice = dict(_ADVICE).get(key)
        if advice is None:  # the method cannot take these layers
            others = [m.name for m in methods if m.name != method
                      and all(m.supports(modules[e.name]) is None for e in group)]
            advice = (f"methods that take them: {', '.join(map(repr, others))} (method= / "
                      "--method)" if others else "no other method takes them either")
        reasons = {e.reason for e in group}
        parts.append(
            f"{_share(sum(e.dense_params for e in group), total)} in "
            f"{_named('layer', 'layers', [e.name for e in group])} kept dense: "
            f"{reasons.pop() if len(reasons) == 1 else key}; {advice}."
        )
    parts.append(f"Ask for a ratio of at most {best:.2f}, or change what is above (a "
                 "keyword of gkpd.plan / a flag of gkpd compress).")
    return " ".join(parts)
