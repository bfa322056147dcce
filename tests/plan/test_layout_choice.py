"""The layout an error plan runs in (``gkpd.plan(..., layout=...)``,
``gkpd.plan.layout_choice.choose_plan_layout``)."""

import pytest
import torch
from testkit.layers import strided_cnn
from torch import nn

import gkpd
from gkpd.layout import LAYOUTS, layout_of
from gkpd.plan import layout_choice
from gkpd.plan.objective import LatencyObjective


def _faster_in(layout, monkeypatch):
    """Make the timing say the compressed model runs twice as fast in ``layout``."""
    def fake(calls, **kwargs):
        for call in calls.values():
            call()  # each model still runs
        return {key: (1.0 if key == ("compressed", layout) else 2.0) for key in calls}

    monkeypatch.setattr(layout_choice, "time_interleaved", fake)


@pytest.mark.parametrize("faster", LAYOUTS)
def test_an_error_plan_runs_in_the_layout_its_model_ran_fastest_in(faster, monkeypatch):
    _faster_in(faster, monkeypatch)
    model, x = strided_cnn().eval(), torch.randn(2, 3, 8, 8)
    plan = gkpd.plan(model, x, ratio=3, tolerance=0.05)
    assert plan.objective == "error" and plan.layout == faster
    timed = plan.options["model_latency"]
    assert timed["batch"] == 2  # the example input's
    assert timed["ms"] == {layout: 1000.0 if layout == faster else 2000.0 for layout in LAYOUTS}
    assert sorted(timed["dense_ms"]) == sorted(LAYOUTS)
    compressed = gkpd.apply_(strided_cnn().eval(), plan)
    assert layout_of(compressed) == faster
    # the oracle: the same plan run in NCHW gives the same outputs, in NCHW
    plan.options["layout"] = "contiguous"
    plain = gkpd.apply_(strided_cnn().eval(), plan)
    with torch.no_grad():
        y = compressed(x)
        torch.testing.assert_close(y, plain(x), rtol=1e-4, atol=1e-5)
    assert y.is_contiguous()


@pytest.mark.parametrize("slower, chosen", [(1.03, "channels_last"), (1.08, "contiguous")])
def test_a_tie_goes_to_channels_last(slower, chosen, monkeypatch):
    """The example's batch need not be the one the model serves: channels_last, faster at
    larger batches, is kept unless NCHW is faster by more than 5%."""
    def fake(calls, **kwargs):
        return {key: slower if key == ("compressed", "channels_last") else 1.0 for key in calls}

    monkeypatch.setattr(layout_choice, "time_interleaved", fake)
    plan = gkpd.plan(strided_cnn().eval(), torch.randn(1, 3, 8, 8), ratio=3, tolerance=0.05)
    assert plan.layout == chosen


def test_an_error_plan_is_timed_for_real():
    model, x = strided_cnn().eval(), torch.randn(1, 3, 8, 8)
    plan = gkpd.plan(model, x, ratio=3, tolerance=0.05)
    timed = plan.options["model_latency"]
    assert 0 < timed["ms"][plan.layout] <= min(timed["ms"].values()) * 1.05
    assert plan.latency_speedup() == min(timed["dense_ms"].values()) / timed["ms"][plan.layout]


class _ViewsItsActivation(nn.Module):
    """``x.view(N, -1)`` of a conv's output: fine in NCHW, an error in channels_last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.view(x.size(0), -1))


def test_a_layout_the_model_fails_in_is_left_out(tmp_path, caplog):
    model, x = _ViewsItsActivation().eval(), torch.randn(2, 3, 8, 8)
    with caplog.at_level("INFO", logger="gkpd.plan.layout_choice"):
        plan = gkpd.plan(model, x, ratio=2, min_params=0)
    assert plan.layout == "contiguous"
    timed = plan.options["model_latency"]
    assert list(timed["ms"]) == list(timed["dense_ms"]) == ["contiguous"]
    assert "fails in channels_last, which is left out: RuntimeError: view size" in caplog.text
    assert gkpd.apply_(_ViewsItsActivation().eval(), plan)(x).shape == (2, 10)
    with pytest.raises(ValueError, match=r"fails in every layout it could run in "
                                         r"\(channels_last; see the log\)"):
        gkpd.plan(model, x, ratio=2, min_params=0, objective=LatencyObjective(
            layout="channels_last", cache=tmp_path / "t.json"))
    # asked for by name, the layout is checked at planning, not at the model's first call
    with pytest.raises(ValueError, match=r"layout='channels_last': the model fails on "
                                         r"example_input in that layout \(RuntimeError: view"):
        gkpd.plan(model, x, ratio=2, min_params=0, layout="channels_last")
    assert model(x).shape == (2, 10) and layout_of(model) == "contiguous"  # left as it was


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_layout_asked_for_is_kept_untimed(layout, monkeypatch):
    monkeypatch.setattr(layout_choice, "time_interleaved", pytest.fail)
    plan = gkpd.plan(strided_cnn().eval(), torch.randn(2, 3, 8, 8), ratio=3, tolerance=0.05,
                     layout=layout)
    assert plan.layout == layout and "model_latency" not in plan.options
    assert layout_of(gkpd.apply_(strided_cnn().eval(), plan)) == layout


def test_a_model_without_image_inputs_has_no_layout_to_choose(monkeypatch):
    monkeypatch.setattr(layout_choice, "time_interleaved", pytest.fail)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    plan = gkpd.plan(model, torch.randn(4, 64), ratio=2, min_params=0, tolerance=0.1)
    assert plan.layout == "contiguous" and "model_latency" not in plan.options


def test_the_layout_reaches_a_latency_plan(tmp_path):
    plan = gkpd.plan(strided_cnn().eval(), torch.randn(2, 3, 8, 8), ratio=3, tolerance=0.05,
                     objective=LatencyObjective(cache=tmp_path / "t.json"), layout="contiguous")
    assert plan.options["latency_layout"] == "contiguous" and plan.layout == "contiguous"


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="layout must be 'auto' or one of"):
        gkpd.plan(strided_cnn().eval(), torch.randn(2, 3, 8, 8), ratio=3, layout="nhwc")
    with pytest.raises(ValueError, match="layout='channels_last' contradicts"):
        gkpd.plan(strided_cnn().eval(), torch.randn(2, 3, 8, 8), ratio=3, layout="channels_last",
                  objective=LatencyObjective(layout="contiguous", cache=None))
