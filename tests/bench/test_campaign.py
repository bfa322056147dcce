import json

import pytest

from gkpd.bench.campaign import collect_rows, write_campaign

BUDGET = {"alpha": 0.9, "batch_size": 128, "epochs": 3, "lr": 0.01, "student_lr": 0.1,
          "temperature": 4.0, "train_subset": None, "weight_decay": 0.0005}


def cell(root, seed, method, ratio, after, status="ok", **extra):
    seed_dir = root / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    (seed_dir / "bench.json").write_text(json.dumps(
        {"budget": {**BUDGET, "seed": seed}, "context": {"model": "m", "data": "d"}}))
    (seed_dir / "dense.json").write_text(json.dumps(
        {"method": "dense", "accuracy_after": 94.0, "params": 1000}))
    result = {"method": method, "ratio": ratio, "achieved_ratio": ratio, "params": 1000 / ratio,
              "macs": 10, "accuracy_before": 50.0, "accuracy_after": after, "status": status,
              "epochs": 3, **extra}
    (seed_dir / f"{method}-{ratio:g}x").mkdir()
    (seed_dir / f"{method}-{ratio:g}x" / "result.json").write_text(json.dumps(result))


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
    cell(tmp_path, 0, "gkpd-whiten", 5.0, 92.0)
    cell(tmp_path, 0, "tucker", 5.0, 92.5)
    write_campaign(tmp_path, train_size=60000, plot=False)
    text = (tmp_path / "results.md").read_text()
    assert "- gkpd-plain: method 'gkpd', pinning nothing: method='gkpd' with its default " \
        "arguments." in text
    assert "- gkpd-whiten: method 'gkpd', pinning calibration={'samples': 512, " in text
    assert "- tucker:" not in text
