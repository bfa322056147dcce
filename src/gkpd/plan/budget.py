"""Share a whole-model parameter budget among layers.

Each layer offers Pareto-sorted candidates (params rising, error falling). ``fixed`` counts
every parameter no strategy touches (BatchNorm, layers left dense, ...). A strategy returns
one candidate index per layer (``None``: the layer stays dense).
"""

from __future__ import annotations

import math

import numpy as np

from gkpd.plan.candidates import Candidates


class UnreachableRatio(ValueError):
    """A ratio the model cannot reach: ``finding`` says what was found, ``best`` is the largest
    ratio within reach (``None`` where the ratio is within reach but the plan's steps miss
    it); the message adds ``advice``."""

    def __init__(self, finding: str, advice: str = "", best: float | None = None) -> None:
        super().__init__(f"{finding} ({advice})" if advice else finding)
        self.finding, self.best = finding, best


class RatioMissed(UnreachableRatio):
    """The model can shrink to the ratio, but the strategy's steps land outside the
    tolerance (another strategy may meet it)."""


def unreachable(ratio: float, dense_total: int, smallest: int, why: str) -> UnreachableRatio:
    """The error for a ``ratio`` the model cannot reach: ``smallest`` is the fewest
    parameters it can have, ``why`` says under which constraint."""
    best = dense_total / smallest
    where = f" {why}" if why else ""
    return UnreachableRatio(
        f"ratio {ratio:g} is unreachable{where}: the largest reachable whole-model ratio is "
        f"{best:.2f}",
        "relax min_params, include more layers, allow_more_macs=True, or ask for a smaller "
        "ratio", best,
    )


def _check_reachable(layers, fixed, ratio, dense_total, tolerance, why):
    smallest = fixed + sum(int(c.params[0]) for c in layers)
    if dense_total / smallest < ratio * (1 - tolerance):
        raise unreachable(ratio, dense_total, smallest, why)


def _uniform_pair(layers, dense, fixed, ratio, dense_total):
    """The two uniform plans around the budget: the one with the most parameters within it
    (or the smallest, where none fits) and the next larger one (``None`` where there is
    none), each as ``(picks, total)``."""

    def choose(rho: float) -> tuple[list[int], int]:
        picks = []
        for c, d in zip(layers, dense, strict=True):
            i = int(np.searchsorted(c.params, d / rho, side="right")) - 1
            picks.append(max(i, 0))
        return picks, fixed + sum(int(c.params[i]) for c, i in zip(layers, picks, strict=True))

    breakpoints = np.unique(np.concatenate(
        [d / c.params.astype(np.float64) for c, d in zip(layers, dense, strict=True)]
    ))
    lo, hi = 0, len(breakpoints) - 1
    target_total = dense_total / ratio
    while lo < hi:  # smallest ρ whose total fits the budget
        mid = (lo + hi) // 2
        if choose(breakpoints[mid])[1] <= target_total:
            hi = mid
        else:
            lo = mid + 1
    return choose(breakpoints[lo]), (choose(breakpoints[lo - 1]) if lo > 0 else None)


def uniform(
    layers: list[Candidates], dense: list[int], fixed: int, ratio: float, dense_total: int,
    tolerance: float,
) -> list[int | None]:
    """Every layer at the same layer ratio ρ: the best candidate within ``dense/ρ``; ρ is the
    one that brings the whole model closest to ``ratio`` (within ``tolerance``)."""
    _check_reachable(layers, fixed, ratio, dense_total, tolerance, "with every layer compressed")
    options = [o for o in _uniform_pair(layers, dense, fixed, ratio, dense_total) if o]
    picks, total = min(options, key=lambda o: abs(dense_total / o[1] - ratio))
    return list(picks)


def near_uniform(
    layers: list[Candidates], dense: list[int], fixed: int, ratio: float, dense_total: int,
    tolerance: float,
) -> list[int | None]:
    """The largest uniform plan within the budget, and what is left of the budget spent where
    the error falls most per parameter: the default where uniform's steps miss the ratio.

    It keeps uniform's even spread (every layer compressed, none starved: the global
    allocation gave six of ResNet-32's convolutions rank 1 at 9.93x) and lands within a few
    parameters of the budget.
    """
    _check_reachable(layers, fixed, ratio, dense_total, tolerance, "with every layer compressed")
    (picks, total), _ = _uniform_pair(layers, dense, fixed, ratio, dense_total)
    params = [c.params.astype(np.float64) for c in layers]
    errors = [c.error**2 for c in layers]
    return _spend_rest(params, errors, list(picks), dense_total / ratio - total)


def _spend_rest(params: list[np.ndarray], errors: list[np.ndarray], picks: list[int],
                left: float) -> list[int]:
    """``picks`` raised, one option at a time, where the error falls most per added parameter,
    until no raise fits in ``left`` parameters."""
    while True:
        best, gain_per_param = None, 0.0
        for layer, (p, e) in enumerate(zip(params, errors, strict=True)):
            i = picks[layer]
            extra = p - p[i]
            ok = (extra > 0) & (extra <= left) & (e < e[i])
            if not ok.any():
                continue
            gains = np.where(ok, (e[i] - e) / np.where(extra > 0, extra, 1.0), -1.0)
            j = int(np.argmax(gains))
            if gains[j] > gain_per_param:
                best, gain_per_param = (layer, j), gains[j]
        if best is None:
            return picks
        layer, j = best
        left -= params[layer][j] - params[layer][picks[layer]]
        picks[layer] = j


def global_(
    layers: list[Candidates], dense: list[int], fixed: int, ratio: float, dense_total: int,
    tolerance: float,
) -> list[int | None]:
    """Minimize the summed squared relative error under the budget (a layer may stay dense).

    A Lagrangian sweep (each layer minimizes ``err² + λ·params``) finds the allocation on the
    convex hull; a greedy pass then spends what is left of the budget where the error falls
    most per parameter.
    """
    _check_reachable(layers, fixed, ratio, dense_total, tolerance, "")
    budget = dense_total / ratio - fixed
    # option tables with the dense layer appended as the last, error-free option
    params = [np.append(c.params, d).astype(np.float64) for c, d in zip(layers, dense, strict=True)]
    errors = [np.append(c.error, 0.0) ** 2 for c in layers]

    def choose(lam: float) -> list[int]:
        return [int(np.argmin(e + lam * p)) for p, e in zip(params, errors, strict=True)]

    def spent(picks: list[int]) -> float:
        return sum(p[i] for p, i in zip(params, picks, strict=True))

    lo, hi = 0.0, 1.0
    while spent(choose(hi)) > budget and hi < 1e12:
        hi *= 4.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if spent(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
    picks = choose(hi)
    if spent(picks) > budget:  # the λ sweep cannot go lower: take the smallest everywhere
        picks = [0] * len(layers)
    picks = _spend_rest(params, errors, picks, budget - spent(picks))
    return [None if i == len(c) else i for c, i in zip(layers, picks, strict=True)]


STRATEGIES = {"uniform": uniform, "near_uniform": near_uniform, "global": global_}


def achieved(picks, layers, dense, fixed) -> int:
    total = fixed
    for c, d, i in zip(layers, dense, picks, strict=True):
        total += d if i is None else int(c.params[i])
    return total


def check_tolerance(total: int, dense_total: int, ratio: float, tolerance: float) -> None:
    got = dense_total / total
    if not math.isclose(got, ratio, rel_tol=tolerance):
        raise RatioMissed(
            f"ratio {ratio:g} cannot be met within {tolerance:.0%}: the nearest plan reaches "
            f"{got:.2f} (rank steps are too coarse for this model; try another ratio)"
        )
