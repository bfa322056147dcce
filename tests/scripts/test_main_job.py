"""The main job's fine-tuning budget (scripts/main_job_budget.py), on a simulated clock and
wired into the real fine-tuning loop on a tiny model; the whole job runs end to end in
tests/cli/test_cli.py."""

import argparse

import main_job
import pytest
import torch
from main_job_budget import MIN_BATCHES, RESERVE_SECONDS, FineTuningBudget
from testkit.fake_data import write_fake_fashion_mnist
from torch import nn
from torch.utils.data import DataLoader

from gkpd import data
from gkpd.train import loop

BATCH, EVAL = 128, 10.0


def _simulate(speeds, *, rechecked: bool, deadline: float = 600.0):
    """Fine-tuning on a simulated clock: ``speeds(t)`` is the seconds per training image at
    time ``t`` (evaluation slows alike). Epochs train batch after batch as the main job does:
    ``rechecked``, asking the budget whether to stop before each batch and resizing the next
    draw after each epoch; otherwise (as before) the first epoch's number for all. Returns
    (end of fine-tuning, images per epoch)."""
    budget = FineTuningBudget(deadline=deadline, epochs=3, batch_size=BATCH,
                              seconds_per_image=speeds(0.0), seconds_per_eval=EVAL,
                              max_images=60000)
    budget.start(0.0)
    now, draw, trained_per_epoch = 0.0, budget.images(0.0), []
    for _ in range(3):
        started, trained = now, 0
        while trained + BATCH <= draw and not (rechecked and budget.must_stop(trained, now)):
            now += BATCH * speeds(now)
            trained += BATCH
        train_seconds = now - started
        now += EVAL * speeds(now) / speeds(0.0)
        fits = budget.epoch_done(trained, train_seconds, now)
        trained_per_epoch.append(trained)
        if rechecked and fits:
            draw = fits
    return now, trained_per_epoch


def test_a_quiet_machine_spends_the_budget_on_equal_epochs():
    end, images = _simulate(lambda t: 0.0034, rechecked=True)
    assert min(images) > 40000 and max(images) - min(images) <= BATCH  # rounding to batches
    assert 600 - RESERVE_SECONDS - 2 < end <= 600 - RESERVE_SECONDS


@pytest.mark.parametrize("slow_from", [100.0, 250.0, 400.0])  # in epoch 1, 2 or 3
def test_a_machine_that_slows_down_mid_run_still_ends_in_time(slow_from):
    def speeds(t):  # another process takes a core: three times slower from then on
        return 0.0034 * (3 if t >= slow_from else 1)

    old_end, old_images = _simulate(speeds, rechecked=False)
    assert old_end > 700  # fixed once from the first speed, the job ran late
    end, images = _simulate(speeds, rechecked=True)
    assert end <= 600 - RESERVE_SECONDS + 5  # the reserve is left for the steps after
    assert images[2] < old_images[2]  # the later epochs drew less
    assert min(images) >= MIN_BATCHES * BATCH


def test_a_budget_too_small_trains_the_floor_and_says_so():
    budget = FineTuningBudget(deadline=100.0, epochs=3, batch_size=BATCH,
                              seconds_per_image=0.01, seconds_per_eval=EVAL, max_images=60000)
    assert budget.images(0.0) == MIN_BATCHES * BATCH and budget.short
    assert budget.images(-1000.0) < 60000 and not budget.short
    assert not budget.must_stop(MIN_BATCHES * BATCH - 1, 1e6)  # never below the floor
    assert budget.must_stop(MIN_BATCHES * BATCH, 1e6)
    assert FineTuningBudget(deadline=1e9, epochs=1, batch_size=BATCH, seconds_per_image=0.01,
                            seconds_per_eval=EVAL, max_images=500).images(0.0) == 500


class _Clock:
    """A simulated clock for ``time.time`` and ``time.perf_counter``: it moves only when
    ``_Student`` computes."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    perf_counter = time


class _Student(nn.Module):
    """A tiny classifier whose training batches take ``seconds`` each on ``clock`` (an
    evaluation batch a third of it), ``seconds`` tripling after ``fast`` training batches:
    another process took the core."""

    def __init__(self, clock: _Clock, seconds: float, fast: int) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)
        self.clock, self.seconds, self.fast, self.batches = clock, seconds, fast, 0

    def forward(self, x):
        if self.training:
            self.batches += 1
        slowdown = 3 if self.batches > self.fast else 1
        self.clock.now += self.seconds * slowdown / (1 if self.training else 3)
        return self.fc(x.flatten(1))


def test_the_job_stops_a_late_epoch_and_resizes_the_next(tmp_path, monkeypatch, capsys):
    """Wired into the real loop on a simulated clock: the machine slows down three times in
    epoch 2, which stops early; epoch 3 draws fewer images; fine-tuning leaves the reserve."""
    clock = _Clock()
    monkeypatch.setattr(main_job, "time", clock)
    monkeypatch.setattr(loop, "time", clock)
    data_dir = write_fake_fashion_mnist(tmp_path / "data", n_train=1280, n_test=16)
    args = argparse.Namespace(data_dir=str(data_dir), batch_size=16, epochs=3, lr=0.01,
                              no_progress=True, budget_minutes=1.0)
    torch.manual_seed(0)
    student = _Student(clock, seconds=0.032, fast=41)  # 2 ms an image, then 6 ms
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    eval_loader = DataLoader(data.build_dataset("fashion-mnist", "test", data_dir,
                                                augment=False), batch_size=16)
    budget = FineTuningBudget(deadline=clock.now + RESERVE_SECONDS + 4.0, epochs=3,
                              batch_size=16, seconds_per_image=0.002, seconds_per_eval=0.02,
                              max_images=1280)
    subset = budget.images(clock.now)
    assert subset == 656  # (4 s / 3 - 20 ms) at 2 ms an image, in whole batches
    history, images = main_job.fine_tune(args, student, teacher, eval_loader,
                                         tmp_path / "ft", subset, budget)
    out = capsys.readouterr().out
    assert len(history) == 3 and images[0] == 656  # epoch 1 ran as planned: 41 batches
    assert "epoch 2: stopped after" in out and "(3.00x the estimate)" in out
    assert images[2] < images[1] < images[0]
    # fine-tuning ended in time to leave the reserve (less at most one slow batch)
    assert clock.now <= budget.deadline - RESERVE_SECONDS + 3 * 0.032


def test_the_job_plans_for_latency_by_default(monkeypatch, tmp_path):
    calls = {}

    class Plan:
        options = {}

    def fake_compress(model, x, **options):
        calls.update(options)
        return model, Plan()

    monkeypatch.setattr(main_job, "compress", fake_compress)
    monkeypatch.setattr(main_job, "compressed_card", lambda card, plan, **kw: {})
    monkeypatch.setattr(main_job, "save", lambda *a, **kw: None)
    card = {"input_size": [1, 28, 28]}
    args = main_job.parse_args([])
    *_, command = main_job.compress_teacher(args, nn.Linear(2, 2), card, tmp_path)
    assert isinstance(calls["objective"], main_job.LatencyObjective)
    assert "--objective latency --latency-batch 64 --latency-max-seconds 180" in command
    # timed at batch 64, where the factors pay; the timing may spend a fifth of the 15-minute
    # budget; no budget, no limit
    assert calls["objective"].batch == 64 and calls["objective"].max_seconds == 180
    main_job.compress_teacher(main_job.parse_args(["--budget-minutes", "0"]), nn.Linear(2, 2),
                              card, tmp_path)
    assert calls["objective"].max_seconds is None
    main_job.compress_teacher(main_job.parse_args(["--objective", "error"]), nn.Linear(2, 2),
                              card, tmp_path)
    assert calls["objective"] == "error"


def test_latency_counts_the_dense_model_in_its_faster_layout(monkeypatch):
    # the timer says the dense model runs in 3 ms as it comes, in 1 ms as its channels_last
    # copy, and the compressed model in 2 ms
    def fake_latency(model, x, **kwargs):
        if model is compressed:
            return {"median_ms": 2.0}
        return {"median_ms": 3.0 if model is dense else 1.0}

    dense, compressed = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
    monkeypatch.setattr(main_job, "measure_latency", fake_latency)
    result = main_job.latencies(dense, compressed, repeats=1)
    for batch in ("batch_1", "batch_64"):
        entry = result[batch]
        assert entry["dense_layout"] == "channels_last" and entry["dense"] == 1.0
        assert entry["dense_by_layout"] == {"contiguous": 3.0, "channels_last": 1.0}
        assert entry["speedup"] == 0.5


def test_busy_steps_are_those_where_others_kept_a_quarter_core_busy():
    others = {"planning": 0.02, "fine_tuning": 1.43, "latency": None}
    assert main_job.busy_steps(others) == ["fine_tuning"]
    assert main_job.busy_steps({"planning": main_job.BUSY_CORES}) == ["planning"]
    others["latency"] = 0.9
    assert main_job.describe_others(others, main_job.busy_steps(others)) == (
        "1.4 during fine-tuning, 0.9 during latency"
    )


def test_threads_drop_to_the_free_cores_unless_the_user_chose_them(monkeypatch):
    monkeypatch.setattr(main_job.os, "cpu_count", lambda: 2)
    monkeypatch.delenv(main_job.THREADS_ENV, raising=False)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main_job.fit_threads_to_load(0.05) == {
            "started": 2, "used": 2, "chosen_by_user": False}
        assert main_job.fit_threads_to_load(1.4) == {
            "started": 2, "used": 1, "chosen_by_user": False}
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv(main_job.THREADS_ENV, "2")
        assert main_job.fit_threads_to_load(1.4)["used"] == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_the_report_says_whether_the_machine_was_busy_and_what_the_job_did():
    from main_job_report import _machine_note

    quiet = {"other_processes_cores": {"planning": 0.02, "latency": None}, "busy_steps": [],
             "busy_cores": 0.25, "threads": {"started": 2, "used": 2}}
    assert _machine_note(quiet)[0] == (
        "Cores other processes kept busy on average — planning 0.02. The machine was quiet.")
    busy = {**quiet, "other_processes_cores": {"planning": 1.51}, "busy_steps": ["planning"],
            "threads": {"started": 2, "used": 1}}
    text = _machine_note(busy)[0]
    assert "planning 1.51. **The machine was busy**" in text
    assert "ran on 1 of 2 threads" in text
    assert "unknown" in _machine_note({"other_processes_cores": {"planning": None}})[0]
