"""select_layers: override dicts carry the method's own settings (the method checks them);
select checks their form, and a layer given settings is compressed whatever the defaults."""

import pytest
from torch import nn

from gkpd.plan.select import select_layers

LAYERS = {"stem": nn.Conv2d(3, 8, 3), "body": nn.Conv2d(8, 8, 3), "tiny": nn.Linear(2, 2)}


def _select(overrides):
    return select_layers(LAYERS, include=None, exclude=None, overrides=overrides,
                         first_layer="stem", min_params=100)


def test_method_settings_pass_through_and_force_the_layer():
    selection = _select({"tiny": {"ranks": [1, 1]}, "stem": {"rank": 2}, "body": "skip"})
    assert selection.overrides["tiny"] == {"ranks": [1, 1]}
    assert selection.reasons["tiny"] is None and selection.reasons["stem"] is None
    assert selection.reasons["body"] == "skipped by override"
    defaults = _select(None)
    assert "first layer" in defaults.reasons["stem"] and "too small" in defaults.reasons["tiny"]


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"nope": "skip"}, ValueError, "'nope'"),
        ({"body": 3}, TypeError, "must be 'skip' or a dict"),
        ({"body": {1: 2}}, TypeError, "keys must be setting names"),
        ({"body": {"skip": "yes"}}, TypeError, "must be True or False"),
    ],
)
def test_bad_override_forms_are_refused(overrides, error, match):
    with pytest.raises(error, match=match):
        _select(overrides)


def test_a_pattern_may_name_a_module_holding_layers():
    layers = {"rnn.l0.ih": nn.Linear(8, 32), "rnn.l0.hh": nn.Linear(8, 32),
              "rnn_head": nn.Linear(8, 8), "head": nn.Linear(8, 4)}

    def reasons(**patterns):
        options = {"include": None, "exclude": None, **patterns}
        return select_layers(layers, overrides=None, first_layer=None, min_params=0,
                             **options).reasons

    assert [n for n, r in reasons(include="rnn").items() if r is None] == [
        "rnn.l0.ih", "rnn.l0.hh"]  # not rnn_head: a parent's name ends at a dot
    assert [n for n, r in reasons(exclude=["rnn.l0"]).items() if r is None] == [
        "rnn_head", "head"]
    with pytest.raises(ValueError, match="a pattern is such a layer's type .* or a parent's"):
        reasons(include="LSTM")
