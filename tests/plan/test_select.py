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
