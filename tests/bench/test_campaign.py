import json

import pytest
from testkit.campaign import cell, lr_campaign

from gkpd.bench.campaign import collect_campaign, collect_rows, write_campaign


def test_rows_per_seed_and_mean_sd_per_method(tmp_path):
    for seed, after in enumerate([92.0, 93.0, 94.0]):
        cell(tmp_path, seed, "gkpd", 5.0, after)
    cell(tmp_path, 0, "tucker", 5.0, 92.5)
    cell(tmp_path, 1, "cp", 5.0, 0.0, status="failed", error="boom")
    results = write_campaign(tmp_path, train_size=60000, plot=False)
    rows = results["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("gkpd", 0), ("gkpd", 1), ("gkpd", 2), ("tucker", 0)]
    assert all(r["train_samples"] == 60000 and r["epochs"] == 3 for r in rows)
    gkpd_row = next(s for s in results["summary"] if s["method"] == "gkpd")
    assert gkpd_row["accuracy_after"] == pytest.approx(93.0)
    assert gkpd_row["accuracy_after_sd"] == pytest.approx(1.0)
    tucker = next(s for s in results["summary"] if s["method"] == "tucker")
    assert tucker["accuracy_after_sd"] is None
    assert results["failed"] == [{"dir": "seed1/cp-5x", "error": "boom"}]
    text = (tmp_path / "results.md").read_text()
    assert "| 5x | gkpd | 3 | 5.00x | 0.20k | 50.00 | 93.00 ± 1.00 | -1.00 |" in text
    assert "seed1/cp-5x failed: boom" in text
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows


def test_seeds_of_another_budget_are_refused(tmp_path):
    cell(tmp_path, 0, "gkpd", 5.0, 92.0)
    cell(tmp_path, 1, "gkpd", 5.0, 92.0)
    data = json.loads((tmp_path / "seed1" / "bench.json").read_text())
    data["budget"]["epochs"] = 2
    (tmp_path / "seed1" / "bench.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="another budget"):
        collect_rows(tmp_path)


def test_the_table_says_what_each_variant_runs(tmp_path):
    cell(tmp_path, 0, "gkpd-plain", 5.0, 93.0)
    cell(tmp_path, 1, "gkpd", 5.0, 94.0)
    cell(tmp_path, 0, "gkpd-whiten", 5.0, 92.0)
    cell(tmp_path, 0, "tucker", 5.0, 92.5)
    results = write_campaign(tmp_path, train_size=60000, plot=False)
    text = (tmp_path / "results.md").read_text()
    # a variant pinning nothing made gkpd's own call: its cell is a gkpd row
    assert "| 5x | gkpd | 2 | 5.00x | 0.20k | 50.00 | 93.50 ± 0.71 |" in text
    plain = next(r for r in results["rows"] if r["cell"] == "seed0/gkpd-plain-5x")
    assert plain["method"] == "gkpd" and plain["settings"]["run_as"] == "gkpd-plain"
    assert "- gkpd: includes the cells run as gkpd-plain, a variant that pins nothing (the " \
        "same call, method='gkpd' with its default arguments)." in text
    assert "- gkpd-whiten: method 'gkpd', pinning calibration={'samples': 512, " in text
    assert "| gkpd-plain |" not in text and "- tucker:" not in text


def test_several_learning_rates_give_each_method_its_best(tmp_path):
    shared, low = lr_campaign(tmp_path)
    results = write_campaign(tmp_path, cells=[shared, low], train_size=60000, plot=False)
    best = {s["method"]: (s["lr"], s["accuracy_after"], len(s["seeds"]))
            for s in results["best"]}
    assert best == {"cp": (0.001, 93.7, 1), "gkpd": (0.01, pytest.approx(93.4), 2)}
    assert [s["method"] for s in results["best"]] == ["cp", "gkpd"]  # best first
    assert len(results["summary"]) == 4  # every (method, lr) measured
    assert {r["cell"] for r in results["rows"]} == {
        "cells/seed0/gkpd-5x", "cells/seed1/gkpd-5x", "cells/seed0/cp-5x",
        "cells-lr0.001/seed0/gkpd-5x", "cells-lr0.001/seed0/cp-5x"}
    assert results["budget"]["lr"] == [0.001, 0.01]
    assert all(r["settings"]["lr"] == (0.001 if "lr0.001" in r["cell"] else 0.01)
               for r in results["rows"])
    text = (tmp_path / "results.md").read_text()
    head, every = text.split("Every learning rate measured:")
    assert "| 5x | cp | 0.001 | 1 | 5.00x | 0.20k | 50.00 | 93.70 | -0.30 |" in head
    assert "| 5x | gkpd | 0.01 | 2 |" in head
    assert "| 5x | cp | 0.01 |" not in head and "| 5x | cp | 0.01 | 1 |" in every
    assert "lr 0.001 or 0.01 as the table says" in text


def test_the_student_is_summarized_at_its_own_learning_rate(tmp_path):
    shared, low = lr_campaign(tmp_path)
    cell(shared, 0, "student", 5.0, 91.0)
    cell(low, 0, "student", 5.0, 91.2, budget={"lr": 0.001, "student_lr": 0.05})
    results = collect_campaign([shared, low])
    assert sorted(r["settings"]["lr"] for r in results["rows"] if r["method"] == "student") == [
        0.05, 0.1]


def test_one_learning_rate_keeps_the_plain_table(tmp_path):
    shared, _ = lr_campaign(tmp_path)
    cell(shared, 0, "student", 5.0, 91.0)  # trained at its own student_lr, in the same budget
    write_campaign(tmp_path, cells=[shared], train_size=60000, plot=False)
    text = (tmp_path / "results.md").read_text()
    assert "| 5x | gkpd | 2 | 5.00x |" in text and "best learning rate" not in text
    assert "| 5x | student | 1 | 5.00x |" in text


def test_directories_of_a_campaign_differ_only_in_learning_rate(tmp_path):
    shared, low = lr_campaign(tmp_path)
    other = tmp_path / "cells-6ep"
    cell(other, 0, "gkpd", 5.0, 93.9, budget={"epochs": 6})
    with pytest.raises(ValueError, match=r"cells-6ep has another budget \(epochs\)"):
        collect_campaign([shared, other])
    twin = tmp_path / "twin"
    cell(twin, 0, "gkpd", 5.0, 93.1)
    with pytest.raises(ValueError, match="same cell .*gkpd 5x, seed 0, lr 0.01"):
        collect_campaign([shared, low, twin])
    with pytest.raises(ValueError, match="holds no seed directory"):
        collect_campaign([shared, tmp_path / "missing"])
    with pytest.raises(ValueError, match="at least one"):
        collect_campaign([])
