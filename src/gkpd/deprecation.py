"""Renamed public names keep working for a while: the old attribute forwards to the new one
and warns (``DeprecationWarning``)."""

from __future__ import annotations

import warnings
from typing import Any


def renamed(old: str, new: str, *, settable: bool = True) -> property:
    """A property ``old`` reading (and, if ``settable``, writing) attribute ``new``."""

    def warn(owner: object) -> None:
        warnings.warn(f"{type(owner).__name__}.{old} is deprecated: use .{new}",
                      DeprecationWarning, stacklevel=3)

    def get(self: Any) -> Any:
        warn(self)
        return getattr(self, new)

    def put(self: Any, value: Any) -> None:
        warn(self)
        setattr(self, new, value)

    return property(get, put if settable else None, doc=f"Deprecated name of ``{new}``.")
