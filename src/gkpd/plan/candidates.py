"""The configurations a method offers for one layer, as parallel arrays."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TIE = 1e-9  # relative errors closer than this are the same error to the planner


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

        Among equal (params, error) the one with fewer MACs stays, and among those the one
        whose configuration reads first (``repr``): errors that are equal in exact arithmetic
        (a split and its mirror image) differ in the last bits from one SVD routine to the
        next, so errors within ``TIE`` count as equal and the choice does not depend on the
        order the method listed them in or on rounding. The result is sorted by params, with
        error strictly falling.
        """
        if not len(self):
            return self
        error = np.round(self.error / TIE) * TIE
        text = np.argsort(np.argsort(np.array([repr(c) for c in self.configs], dtype=object)))
        order = np.lexsort((text, self.macs, error, self.params))
        keep, best = [], np.inf
        for i in order:
            if error[i] < best - TIE / 2:
                keep.append(i)
                best = error[i]
        return self.subset(np.array(keep, dtype=np.int64))
