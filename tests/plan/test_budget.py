import itertools

import numpy as np
import pytest

from gkpd.plan.budget import (
    RatioMissed,
    achieved,
    check_tolerance,
    global_,
    near_uniform,
    uniform,
)
from gkpd.plan.candidates import Candidates


def _table(params, errors):
    params = np.asarray(params, np.int64)
    return Candidates(params, params.copy(), np.asarray(errors, float), list(range(len(params))))


def _tables(rng, n_layers=4, n_options=6):
    """Pareto tables of rank-like steps of different sizes per layer."""
    tables, dense = [], []
    for _ in range(n_layers):
        step = int(rng.integers(20, 200))
        params = step * np.arange(1, n_options + 1)
        errors = np.sort(rng.uniform(0.05, 0.99, n_options))[::-1]
        tables.append(_table(params, errors))
        dense.append(int(step * n_options * 3))
    return tables, dense


def _largest_uniform_within(tables, dense, fixed, budget):
    """The uniform plan near_uniform starts from, by trying every layer ratio ρ."""
    starts = []
    for rho in np.unique([d / p for t, d in zip(tables, dense, strict=True) for p in t.params]):
        start = [max(int(np.searchsorted(t.params, d / rho, side="right")) - 1, 0)
                 for t, d in zip(tables, dense, strict=True)]
        if achieved(start, tables, dense, fixed) <= budget:
            starts.append(start)
    return max(starts, key=lambda s: achieved(s, tables, dense, fixed))


@pytest.mark.parametrize("seed", range(20))
def test_near_uniform_raises_uniform_plan_until_no_raise_fits(seed):
    rng = np.random.default_rng(seed)
    tables, dense = _tables(rng)
    fixed = 50
    dense_total = fixed + sum(dense)
    ratio = float(rng.uniform(4.0, 8.0))
    budget = dense_total / ratio
    picks = near_uniform(tables, dense, fixed, ratio, dense_total, 0.03)
    total = achieved(picks, tables, dense, fixed)
    start = _largest_uniform_within(tables, dense, fixed, budget)
    assert all(p >= s for p, s in zip(picks, start, strict=True))
    assert total <= budget
    left = budget - total
    for layer, (t, i) in enumerate(zip(tables, picks, strict=True)):
        # no further raise fits what is left of the budget
        assert not any(t.params[j] - t.params[i] <= left and t.error[j] < t.error[i]
                       for j in range(i + 1, len(t))), layer


def test_near_uniform_meets_a_ratio_that_uniform_steps_miss():
    # two layers with steps of 100: uniform totals are 200, 400, ... (+ fixed 0)
    tables = [_table([100, 200, 300, 400], [0.8, 0.6, 0.4, 0.2])] * 2
    dense, ratio = [1000, 1000], 2000 / 500
    with pytest.raises(RatioMissed):
        check_tolerance(achieved(uniform(tables, dense, 0, ratio, 2000, 0.03), tables, dense, 0),
                        2000, ratio, 0.03)
    picks = near_uniform(tables, dense, 0, ratio, 2000, 0.03)
    assert sorted(picks) == [1, 2] and achieved(picks, tables, dense, 0) == 500


def test_near_uniform_compresses_every_layer_where_global_keeps_one_dense():
    # a layer whose error barely falls with rank: global starves it (and keeps an
    # error-free dense layer elsewhere); near_uniform keeps the spread even
    tables = [_table([10, 20, 30], [0.99, 0.98, 0.97]), _table([10, 20, 30], [0.5, 0.1, 0.05])]
    dense = [40, 40]
    global_picks = global_(tables, dense, 0, 80 / 50, 80, 0.03)
    near = near_uniform(tables, dense, 0, 80 / 50, 80, 0.03)
    assert None in global_picks
    assert None not in near and achieved(near, tables, dense, 0) <= 50


def test_top_up_matches_exhaustive_search_on_convex_tables():
    # on convex (diminishing-return) tables with equal steps, raising where the error falls
    # most per parameter is optimal among the plans that only raise the uniform start
    # (near_uniform never lowers a layer below it): oracle by brute force
    tables = [_table([10, 20, 30, 40], [0.9, 0.5, 0.3, 0.2]),
              _table([10, 20, 30, 40], [0.8, 0.6, 0.45, 0.35]),
              _table([10, 20, 30, 40], [0.7, 0.4, 0.25, 0.2])]
    dense = [80, 80, 80]
    budget = 110
    ratio = sum(dense) / budget
    picks = near_uniform(tables, dense, 0, ratio, sum(dense), 0.5)
    start = _largest_uniform_within(tables, dense, 0, budget)
    assert picks != start  # the top-up did something
    best = min(
        (combo for combo in itertools.product(
            *(range(s, len(t)) for t, s in zip(tables, start, strict=True)))
         if achieved(list(combo), tables, dense, 0) <= budget),
        key=lambda combo: sum(t.error[i] ** 2 for t, i in zip(tables, combo, strict=True)),
    )
    assert sum(t.error[i] ** 2 for t, i in zip(tables, picks, strict=True)) == pytest.approx(
        sum(t.error[i] ** 2 for t, i in zip(tables, best, strict=True)))
