"""The configurations a method offers for one layer, as parallel arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Candidates:
    """Configurations of one layer: ``params``, ``macs`` (per sample) and relative ``error``
    of each, and ``configs[i]``, the method's own description of configuration ``i``.

    Index 0 may be the dense layer itself (error 0) where a strategy may keep it.
    ``exact[i]`` (optional) says that ``error[i]`` is already the relative error of the layer
    the method builds, so the planner need not ask :meth:`LayerMethod.exact_error` for it.
    """

    params: np.ndarray
    macs: np.ndarray
    error: np.ndarray
    configs: list[Any]
    exact: np.ndarray | None = None

    def is_exact(self, i: int) -> bool:
        return self.exact is not None and bool(self.exact[i])

    def __len__(self) -> int:
        return len(self.configs)

    @classmethod
    def concatenate(cls, parts: list[Candidates]) -> Candidates:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.params for p in parts]),
            np.concatenate([p.macs for p in parts]),
            np.concatenate([p.error for p in parts]),
            [c for p in parts for c in p.configs],
            np.concatenate([np.zeros(len(p), bool) if p.exact is None else p.exact
                            for p in parts]),
        )

    @classmethod
    def empty(cls) -> Candidates:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), [])

    def subset(self, keep: np.ndarray) -> Candidates:
        keep = np.asarray(keep)
        if keep.dtype == bool:
            keep = np.flatnonzero(keep)
        return Candidates(
            self.params[keep], self.macs[keep], self.error[keep], [self.configs[i] for i in keep],
            None if self.exact is None else self.exact[keep],
        )

    def pareto(self) -> Candidates:
        """Drop every configuration that another beats or ties on params and error.

        Among equal (params, error) the one with fewer MACs stays; the result is sorted by
        params, with error strictly falling.
        """
        if not len(self):
            return self
        order = np.lexsort((self.macs, self.error, self.params))
        keep, best = [], np.inf
        for i in order:
            if self.error[i] < best - 1e-12:
                keep.append(i)
                best = self.error[i]
        return self.subset(np.array(keep, dtype=np.int64))
