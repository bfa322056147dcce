import numpy as np

from gkpd.plan.candidates import Candidates


def _table(rows):
    params, macs, error, configs = zip(*rows, strict=True)
    return Candidates(np.array(params), np.array(macs), np.array(error), list(configs))


def test_pareto_keeps_the_front_sorted_by_params():
    table = _table([(30, 5, 0.2, "c"), (10, 5, 0.5, "a"), (20, 5, 0.6, "worse"),
                    (20, 5, 0.3, "b")])
    front = table.pareto()
    assert front.configs == ["a", "b", "c"]
    assert list(front.params) == [10, 20, 30]


def test_pareto_breaks_ties_the_same_way_whatever_the_order_and_rounding():
    # a split and its mirror image: equal in exact arithmetic, apart in the last bits
    # whichever the noise favours, and in whichever order the method lists them
    for noise in (1e-15, -1e-15):
        mirror = [(10, 7, 0.5, ("A", (2, 1))), (10, 7, 0.5 + noise, ("A", (1, 2)))]
        for rows in (mirror, mirror[::-1]):
            assert _table(rows).pareto().configs == [("A", (1, 2))]
    # fewer MACs still wins a tie in params and error
    rows = [(10, 9, 0.5, "first"), (10, 7, 0.5 + 1e-15, "second")]
    assert _table(rows).pareto().configs == ["second"]
    # errors that differ by more than the tie are not a tie
    rows = [(10, 7, 0.5 + 1e-6, "a"), (10, 7, 0.5, "b")]
    assert _table(rows).pareto().configs == ["b"]
