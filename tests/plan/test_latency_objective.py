"""objective="latency" (gkpd.plan.latency_objective): the fastest option within the error and
size budget, cached timings."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from testkit.layers import strided_cnn
from torch import nn

import gkpd
from gkpd import LatencyObjective, timing
from gkpd.layout import layout_of, run_in_layout
from gkpd.plan import latency_objective, layout_choice
from gkpd.plan.candidates import Candidates
from gkpd.plan.latency_objective import LayerTimer, Option, fastest_within_budget
from gkpd.timing import LatencyCache


class _Ctx:
    def __init__(self, name):
        self.name = name
        self.module = nn.Linear(4, 4)
        self.input_shape = (1, 4)
        self.dense_macs = 10**6  # room for every path of the toy configurations


class _FakeTimer(LayerTimer):
    """Seconds from a table keyed by (a_shape, rank, order); the weight path by "weight"."""

    def __init__(self, seconds):
        super().__init__(1, LatencyCache(None))
        self.seconds = seconds

    def times(self, module, input_shape, options):
        return {
            o: self.seconds.get((o.config[0], o.config[2], o.path), self.seconds["weight"])
            if o.path != "weight" else self.seconds["weight"]
            for o in options
        }


def _table():
    # three factor shapes; params/error of each configuration; index 0 is the error pick
    configs = [((1, 1), (4, 4), 2, "a_first"), ((2, 2), (2, 2), 2, "a_first"),
               ((4, 4), (1, 1), 1, "a_first"), ((2, 2), (2, 2), 1, "a_first")]
    return Candidates(
        np.array([100, 98, 100, 60]), np.array([10, 10, 10, 6]),
        np.array([0.50, 0.54, 0.60, 0.58]), configs,
    )


def test_fastest_within_error_slack_and_budget():
    table = _table()
    slow = {"weight": 9.0, ((1, 1), 2, "a_first"): 5.0, ((1, 1), 2, "b_first"): 6.0,
            ((2, 2), 2, "a_first"): 2.0, ((2, 2), 2, "b_first"): 3.0,
            ((4, 4), 1, "a_first"): 1.0, ((4, 4), 1, "b_first"): 1.5}
    [timed] = fastest_within_budget([_Ctx("l")], [table], [0], timer=_FakeTimer(slow),
                                    error_slack=0.1, fits=lambda extra: True)
    # (4, 4) is fastest but 20% worse; (2, 2) rank 2 is within 10%, the largest rank of its shape
    assert (timed.pick, timed.path, timed.seconds, timed.dense_seconds) == (1, "a_first", 2.0, 9.0)
    [timed] = fastest_within_budget([_Ctx("l")], [table], [0], timer=_FakeTimer(slow),
                                    error_slack=0.25, fits=lambda extra: True)
    assert (timed.pick, timed.path) == (2, "a_first")
    # a budget that allows no change in size keeps the pick's own shape, in its faster order
    [timed] = fastest_within_budget([_Ctx("l")], [table], [0], timer=_FakeTimer(slow),
                                    error_slack=0.25, fits=lambda extra: extra == 0)
    assert (timed.pick, timed.path) == (2, "a_first")  # same params (100): allowed
    [timed] = fastest_within_budget([_Ctx("l")], [table], [0], timer=_FakeTimer(slow),
                                    error_slack=0.1, fits=lambda extra: extra == 0)
    assert (timed.pick, timed.path) == (0, "a_first")


def test_channel_paths_are_offered_where_the_factor_shapes_allow():
    ctx = _Ctx("conv")
    ctx.module, ctx.input_shape = nn.Conv2d(16, 16, 3, padding=1), (1, 16, 8, 8)
    shuffle, square = ((2, 1, 3, 1), (8, 16, 1, 3)), ((4, 4, 3, 1), (4, 4, 1, 3))
    configs = [(*square, 1, "b_first"), (*shuffle, 1, "b_first")]
    table = Candidates(np.array([100, 100]), np.array([10, 10]), np.array([0.5, 0.5]), configs)
    offered = []

    class Recording(_FakeTimer):
        def times(self, module, input_shape, options):
            offered.extend((o.config[0], o.path) for o in options)
            return super().times(module, input_shape, options)

    times = {"weight": 9.0, ((2, 1, 3, 1), 1, "b_first_channels"): 1.0}
    [timed] = fastest_within_budget([ctx], [table], [0], timer=Recording(times),
                                    error_slack=0.0, fits=lambda extra: True)
    assert (timed.pick, timed.path) == (1, "b_first_channels")
    assert ((2, 1, 3, 1), "b_first_channels") in offered
    assert ((2, 1, 3, 1), "a_first_channels") not in offered  # C2 = 16
    assert not any(a == (4, 4, 3, 1) and order.endswith("channels") for a, order in offered)


def test_paths_with_more_macs_than_dense_are_not_timed_but_the_picks_own_order_is():
    from gkpd.layers.base import CHANNEL_PATHS
    from gkpd.methods.gkpd import order_macs

    ctx = _Ctx("conv")
    ctx.module, ctx.input_shape = nn.Conv2d(16, 16, 1), (1, 16, 8, 8)
    ctx.dense_macs = 16 * 16 * 8 * 8
    # a_first with C1 = 1 folds all 16 input channels into the batch: 16x the dense MACs
    configs = [((4, 1, 1, 1), (4, 16, 1, 1), 1, "b_first"),
               ((2, 4, 1, 1), (8, 4, 1, 1), 4, "b_first"),
               ((16, 1, 1, 1), (1, 16, 1, 1), 1, "a_first")]
    table = Candidates(np.array([80, 80, 80]), np.array([1, 1, 1]), np.array([0.5, 0.5, 0.5]),
                       configs)
    offered = []

    class Recording(_FakeTimer):
        def times(self, module, input_shape, options):
            offered.extend(options)
            return super().times(module, input_shape, options)

    for pick in (0, 2):
        offered.clear()
        fastest_within_budget([ctx], [table], [pick], timer=Recording({"weight": 1.0}),
                              error_slack=0.0, fits=lambda extra: True)
        left_out = 0
        for j, (a, b, rank, order) in enumerate(configs):
            macs = order_macs(ctx.module, ctx.input_shape, a, b, rank)
            for path in latency_objective._paths(ctx.module, configs[j]):
                option = Option(configs[j], path)
                own = j == pick and path == order
                if macs[CHANNEL_PATHS.get(path, path)] <= ctx.dense_macs or own:
                    assert option in offered, (j, path)
                else:
                    assert option not in offered, (j, path)
                    left_out += 1
        assert left_out >= 1
    # the pick (16, 1, 1, 1) is itself above dense MACs in a_first and still timed there
    assert order_macs(ctx.module, ctx.input_shape, *configs[2][:3])["a_first"] > ctx.dense_macs


def test_weight_path_wins_when_factors_are_slower_than_dense():
    table = _table()
    times = {"weight": 1.0, ((1, 1), 2, "a_first"): 5.0, ((1, 1), 2, "b_first"): 6.0,
             ((2, 2), 2, "a_first"): 4.0, ((2, 2), 2, "b_first"): 3.0}
    [timed] = fastest_within_budget([_Ctx("l")], [table], [0], timer=_FakeTimer(times),
                                    error_slack=0.1, fits=lambda extra: True)
    assert (timed.pick, timed.path, timed.seconds) == (0, "weight", 1.0)


@pytest.mark.parametrize("layout", ["auto", "contiguous", "channels_last"])
def test_latency_plan_runs_what_it_timed(tmp_path, layout):
    model = strided_cnn().eval()
    x = torch.randn(2, 3, 8, 8)
    cache = tmp_path / "latency.json"
    plan = gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=LatencyObjective(
        batch=4, cache=cache, layout=layout))
    assert plan.objective == "latency" and plan.options["latency_batch"] == 4
    assert plan.options["latency_layout"] == layout
    timed_layouts = ["contiguous", "channels_last"] if layout == "auto" else [layout]
    assert plan.layout in timed_layouts
    # the whole model was timed in each layout, and the dense one in both
    timed = plan.options["model_latency"]
    assert timed["batch"] == 4 and sorted(timed["ms"]) == sorted(timed_layouts)
    assert sorted(timed["dense_ms"]) == ["channels_last", "contiguous"]
    assert plan.latency_speedup() == min(timed["dense_ms"].values()) / timed["ms"][plan.layout]
    assert f"latency at batch 4: {timed['ms'][plan.layout]:.3g} ms in {plan.layout}" in str(plan)
    if layout == "auto":  # the layout kept is the one the compressed model ran fastest in
        assert timed["ms"][plan.layout] == min(timed["ms"].values())
    assert abs(plan.achieved_ratio / 3 - 1) <= 0.05
    error_plan = gkpd.plan(model, x, ratio=3, tolerance=0.05)
    for entry in plan.compressed_layers:
        assert entry.settings["latency_batch"] == 4
        # the weight path (dense speed) is always an option, so no layer is planned slower
        assert entry.settings["latency_ms"] <= entry.settings["dense_latency_ms"] * 1.0001
        assert entry.settings["path"] in ("a_first", "b_first", "weight", "b_first_channels",
                                           "a_first_channels")
        assert entry.relative_error <= error_plan.layer(entry.name).relative_error * 1.1 + 1e-9
    compressed = gkpd.apply_(strided_cnn().eval(), plan)
    assert layout_of(compressed) == plan.layout  # apply_ runs it in the plan's layout
    assert compressed[0].weight.is_contiguous(
        memory_format=torch.channels_last if plan.layout == "channels_last" else
        torch.contiguous_format)
    for entry in plan.compressed_layers:
        layer = compressed.get_submodule(entry.name)
        assert layer.path == entry.settings["path"]  # the timed path is pinned
        assert entry.macs == layer.macs((1, *entry.input_shape[1:]))  # what that path runs
    # the oracle: every layer replaced by its dense reconstruction, in NCHW
    merged = gkpd.apply_(strided_cnn().eval(), plan)
    run_in_layout(merged, "contiguous")
    for entry in plan.compressed_layers:
        parent, _, child = entry.name.rpartition(".")
        holder = merged.get_submodule(parent) if parent else merged
        setattr(holder, child, merged.get_submodule(entry.name).to_dense())
    with torch.no_grad():  # called plainly, with an NCHW input
        torch.testing.assert_close(compressed(x), merged(x), rtol=1e-4, atol=1e-5)
    # a plan saved and loaded keeps the pinned paths and the layout
    gkpd.save(tmp_path / "saved", compressed, plan)
    loaded = gkpd.load(tmp_path / "saved", strided_cnn().eval())
    assert layout_of(loaded) == plan.layout
    for entry in plan.compressed_layers:
        assert loaded.get_submodule(entry.name).path == entry.settings["path"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), merged(x), rtol=1e-4, atol=1e-5)
    saved = json.loads(cache.read_text())
    assert saved["version"] == 4 and saved["entries"]  # 4: timed with the per-axis padding
    # convolutions are timed in the layouts asked for; a linear layer has no such layout
    conv_keys = [key for key in saved["entries"] if "Conv2d" in key]
    assert any("channels_last" in key for key in conv_keys) is ("channels_last" in timed_layouts)
    assert any("channels_last" not in key for key in conv_keys) is ("contiguous" in timed_layouts)
    assert not any("channels_last" in key for key in saved["entries"] if "Linear" in key)


def _whole_models_timed(monkeypatch, factored_faster):
    """Whole-model timings: the compressed model with its weight-path layers factored runs
    faster or slower than with the per-layer picks; each model still runs once."""
    asked = []

    def fake(calls, **kwargs):
        asked.append(sorted(calls))
        for call in calls.values():
            call()
        return {key: (1.0 if (key[0] == "factored") == factored_faster else 2.0)
                for key in calls}

    monkeypatch.setattr(layout_choice, "time_interleaved", fake)
    return asked


@pytest.mark.parametrize("weight_wins", [True, False])
def test_a_plan_that_runs_at_dense_speed_says_so(monkeypatch, caplog, weight_wins):
    def fixed_times(self, module, input_shape, options):  # no timing: the weight path wins
        return {o: (1e-3 if (o.path == "weight") == weight_wins else 2e-3) for o in options}

    monkeypatch.setattr(LayerTimer, "_time", fixed_times)
    _whole_models_timed(monkeypatch, factored_faster=False)
    with caplog.at_level("WARNING", logger="gkpd.plan.objective"):
        plan = gkpd.plan(strided_cnn().eval(), torch.randn(1, 3, 8, 8), ratio=3, tolerance=0.05,
                         objective=LatencyObjective(cache=None, layout="contiguous"))
    paths = {e.settings["path"] for e in plan.compressed_layers}
    assert (paths == {"weight"}) == weight_wins
    warned = "--latency-batch" in caplog.text and "reconstructed weight" in caplog.text
    assert warned == weight_wins


@pytest.mark.parametrize("factored_faster", [True, False])
def test_weight_path_layers_run_factored_where_the_whole_model_is_faster(monkeypatch,
                                                                        factored_faster):
    """A layer timed alone may beat its factors on the weight path and lose in the model:
    the plan with every such layer on its configuration's fastest factored path is timed
    whole beside the per-layer picks, and the faster kept, at the same size."""
    def fixed_times(self, module, input_shape, options):
        return {o: (1e-3 if o.path == "weight" else 2e-3 if o.path == "a_first" else 3e-3)
                for o in options}

    monkeypatch.setattr(LayerTimer, "_time", fixed_times)
    asked = _whole_models_timed(monkeypatch, factored_faster)
    plan = gkpd.plan(strided_cnn().eval(), torch.randn(1, 3, 8, 8), ratio=3, tolerance=0.05,
                     objective=LatencyObjective(cache=None, layout="contiguous"))
    assert asked[0] == [("factored", "contiguous"), ("per-layer", "contiguous")]
    paths = {e.settings["path"] for e in plan.compressed_layers}
    if factored_faster:  # each on its configuration's fastest path offered (a_first where
        # its MACs stay under the dense layer's, else the error plan's own order)
        assert paths and "weight" not in paths and paths <= {"a_first", "b_first"}
    else:
        assert paths == {"weight"}
    plain = gkpd.plan(strided_cnn().eval(), torch.randn(1, 3, 8, 8), ratio=3, tolerance=0.05)
    assert plan.params == plain.params  # the weight path's configuration: the error pick's


def test_stop_leaves_the_remaining_layers_untimed():
    table = _table()
    times = {"weight": 9.0, ((2, 2), 2, "a_first"): 2.0}
    asked = []

    def stop():
        asked.append(True)
        return len(asked) > 1  # time the first layer only

    timings = fastest_within_budget([_Ctx("a"), _Ctx("b"), _Ctx("c")], [table] * 3, [0] * 3,
                                    timer=_FakeTimer(times), error_slack=0.1,
                                    fits=lambda extra: True, stop=stop)
    assert timings[0].pick == 1 and timings[1:] == [None, None]


def test_max_seconds_bounds_the_timing_and_the_plan_says_what_it_left(tmp_path):
    model, x = strided_cnn().eval(), torch.randn(2, 3, 8, 8)
    error_plan = gkpd.plan(model, x, ratio=3, tolerance=0.05)
    plan = gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=LatencyObjective(
        cache=None, max_seconds=1e-9))  # spent before the first layer
    untimed = len(plan.compressed_layers)
    assert plan.options["latency_max_seconds"] == 1e-9
    assert plan.options["latency_untimed"] == untimed > 0
    assert list(plan.options["model_latency"]["ms"]) == ["contiguous"]  # no second layout
    for entry in plan.compressed_layers:  # the error plan's configurations, untimed
        assert "latency_ms" not in entry.settings
        assert entry.settings == error_plan.layer(entry.name).settings
    roomy = gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=LatencyObjective(
        cache=None, max_seconds=600))
    assert roomy.options["latency_untimed"] == 0
    assert all("latency_ms" in e.settings for e in roomy.compressed_layers)


def test_a_linear_model_is_timed_in_nchw_only(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    plan = gkpd.plan(model, torch.randn(2, 64), ratio=2, tolerance=0.1, min_params=0,
                     objective=LatencyObjective(cache=None))
    assert plan.layout == "contiguous"
    assert list(plan.options["model_latency"]["ms"]) == ["contiguous"]
    assert list(plan.options["model_latency"]["dense_ms"]) == ["contiguous"]


def test_channels_last_true_is_the_deprecated_spelling_of_the_layout():
    with pytest.warns(DeprecationWarning, match="layout='channels_last'"):
        objective = LatencyObjective(channels_last=True)
    assert objective == LatencyObjective(layout="channels_last")
    with pytest.raises(ValueError, match="contradicts layout='contiguous'"):
        LatencyObjective(channels_last=True, layout="contiguous")
    with pytest.raises(ValueError, match="latency layout must be 'auto' or one of"):
        LatencyObjective(layout="nhwc")


def test_options_far_slower_than_the_fastest_are_timed_once(monkeypatch):
    class Counting(nn.Module):
        def __init__(self, delay):
            super().__init__()
            self.delay, self.calls = delay, 0

        def forward(self, x):
            self.calls += 1
            time.sleep(self.delay)
            return x

    # 50x apart, and the fast ones not instant: a preempted probe of a 0-delay call on a
    # loaded machine took longer than a quarter of a 20 ms sleep
    modules = {"b_first": Counting(0.002), "a_first": Counting(0.1), "weight": Counting(0.002)}
    monkeypatch.setattr(latency_objective, "runnable",
                        lambda module, option: modules[option.path])
    timer = LayerTimer(2, LatencyCache(None))
    config = ((2, 2, 3, 3), (2, 2, 1, 1), 1, "b_first")
    options = [Option(config, order) for order in modules]
    times = timer.times(nn.Conv2d(4, 4, 3), (1, 4, 8, 8), options)
    assert modules["a_first"].calls == 2  # a warm-up call and one timed call
    assert modules["b_first"].calls == modules["weight"].calls > 2
    assert times[options[1]] >= 0.1 and timer.measured == 3


def _replay(monkeypatch, scale: float) -> list:
    """Make LayerTimer._time return the cached seconds (times ``scale`` for the dense
    reference) instead of timing; returns the list of options it was asked for."""
    asked = []

    def cached_times(self, module, input_shape, options):
        asked.extend(options)
        env = timing.environment_key(module.weight.device, module.weight.dtype)
        result = {}
        for o in options:
            seconds = self.cache.get(self._key(env, module, input_shape, o))
            assert seconds is not None, "asked to time an option the first plan did not"
            result[o] = seconds * (scale if o.path == "weight" else 1.0)
        return result

    monkeypatch.setattr(LayerTimer, "_time", cached_times)
    return asked


def test_second_plan_reads_the_cache_and_only_checks_the_dense_reference(tmp_path,
                                                                          monkeypatch):
    model = strided_cnn().eval()
    x = torch.randn(1, 3, 8, 8)
    # one layout: the whole-model timing that picks between two may pick either
    nchw = LatencyObjective(cache=tmp_path / "latency.json", layout="contiguous")
    first = gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=nchw)
    asked = _replay(monkeypatch, scale=1.1)  # within _STALE: the cache holds
    second = gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=nchw)
    assert asked and {o.path for o in asked} == {"weight"}
    assert len(asked) == len(first.compressed_layers)  # one dense check per layer
    assert [e.settings.get("path") for e in second.layers] == [
        e.settings.get("path") for e in first.layers]
    assert [e.settings.get("a_shape") for e in second.layers] == [
        e.settings.get("a_shape") for e in first.layers]


def test_a_layer_whose_dense_time_moved_is_timed_again(tmp_path, monkeypatch, caplog):
    model = strided_cnn().eval()
    x = torch.randn(1, 3, 8, 8)
    # one layout: the whole-model timing that picks between two may pick either
    nchw = LatencyObjective(cache=tmp_path / "latency.json", layout="contiguous")
    gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=nchw)
    entries = json.loads(nchw.cache.read_text())["entries"]
    asked = _replay(monkeypatch, scale=2.0)  # the machine runs dense at half the speed
    with caplog.at_level("INFO", logger="gkpd"):
        gkpd.plan(model, x, ratio=3, tolerance=0.05, objective=nchw)
    # every option of every layer: the dense check, then all of them again
    assert len(asked) == len(entries) + sum("| dense |" in key for key in entries)
    assert "timing its options again" in caplog.text
    assert "layer(s) timed again" in caplog.text
    saved = json.loads(nchw.cache.read_text())["entries"]
    for key, seconds in saved.items():  # re-timed: the dense reference at its new time
        assert seconds == pytest.approx(entries[key] * (2.0 if "| dense |" in key else 1.0))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"objective": "speed"}, "objective must be one of"),
        ({"objective": "latency", "method": "svd"}, "supported for method 'gkpd' only"),
        ({"objective": "latency", "latency_batch": 0}, "latency_batch must be a positive int"),
        ({"objective": "latency", "latency_slack": -1}, "latency_slack must be a number >= 0"),
        ({"objective": "latency", "latency_channels_last": "yes"},
         "latency_channels_last must be True or False"),
    ],
)
def test_bad_latency_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        gkpd.plan(strided_cnn(), torch.randn(1, 3, 8, 8), ratio=3, **options)
