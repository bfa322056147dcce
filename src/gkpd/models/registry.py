"""A strict registry of model constructors: unknown names are errors, never guesses.

Each model has one name, the zoo's (cards record it), and may have aliases: the names
torchvision and timm give the same architecture where they differ (``mobilenet_v2``). A name
is looked up in any case and with ``-`` for ``_``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_NAMES: dict[str, str] = {}  # every spelling, normalised -> the zoo's name


def _normalised(name: str) -> str:
    return name.lower().replace("-", "_")


def register(
    name: str, *, aliases: Iterable[str] = ()
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        for spelling in (name, *aliases):
            if _normalised(spelling) in _NAMES:
                raise ValueError(f"model name {spelling!r} is registered twice")
            _NAMES[_normalised(spelling)] = name
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted (the zoo's names, not the aliases)."""
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """The zoo's name of the model ``name`` names (itself, or the model of an alias such as
    ``mobilenet_v2``); an unknown name is a ``ValueError`` that lists the close ones."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    try:
        return _NAMES[_normalised(name)]
    except KeyError:
        close = difflib.get_close_matches(_normalised(name), _NAMES, n=5)
        suggestions = list(dict.fromkeys(_NAMES[spelling] for spelling in close))[:3]
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else ""
        raise ValueError(
            f"unknown model name {name!r}{hint} (known: {', '.join(list_models())})"
        ) from None


def create(name: str, **kwargs) -> nn.Module:
    """Build an untrained model by zoo name or alias (``num_classes``, ``in_channels``, ...)."""
    return _REGISTRY[canonical_name(name)](**kwargs)
