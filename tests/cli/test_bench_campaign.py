"""gkpd bench campaign: the summary of campaign directories run at several learning rates."""

import pytest
from testkit.campaign import cell, lr_campaign
from testkit.cli import run, run_json


def test_summary_of_two_learning_rates(capsys, tmp_path):
    shared, low = lr_campaign(tmp_path)
    out = tmp_path / "summary"
    result = run_json(
        capsys, "bench", "campaign", shared, low, "--out", out, "--no-plot", "--train-size", 60000
    )
    assert {(s["method"], s["lr"]) for s in result["best"]} == {("cp", 0.001), ("gkpd", 0.01)}
    assert all(r["train_samples"] == 60000 for r in result["rows"])
    assert "Every learning rate measured:" in (out / "results.md").read_text()


def test_bad_campaign_directories_are_named(capsys, tmp_path):
    shared, _ = lr_campaign(tmp_path)
    code, _, err = run(capsys, "bench", "campaign", shared, tmp_path / "nope", "--out", tmp_path)
    assert code == 2 and "nope is not a directory" in err
    other = tmp_path / "cells-6ep"
    cell(other, 0, "gkpd", 5.0, 93.9, budget={"epochs": 6})
    code, _, err = run(capsys, "bench", "campaign", shared, other, "--out", tmp_path / "o")
    assert code == 2 and "another budget (epochs)" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "bench", "campaign", tmp_path / "empty", "--out", tmp_path / "o")
    assert code == 2 and "empty holds no seed directory" in err
    assert not (tmp_path / "o").exists()


def test_campaign_files_of_the_wrong_shape_are_named(tmp_path):
    from gkpd.bench.campaign import collect_rows

    seed = tmp_path / "seed0"
    (seed / "gkpd-5x").mkdir(parents=True)
    (seed / "bench.json").write_text("[]")
    with pytest.raises(ValueError, match=r"bench.json is not a gkpd bench file \(not a JSON"):
        collect_rows(tmp_path)
    (seed / "bench.json").write_text('{"context": {}}')
    with pytest.raises(ValueError, match="bench.json is not a gkpd bench file .missing budget"):
        collect_rows(tmp_path)
    (seed / "bench.json").write_text('{"budget": {"seed": 0, "epochs": 1, "train_subset": 8}}')
    (seed / "gkpd-5x" / "result.json").write_text('{"status": "ok", "method": "gkpd"}')
    with pytest.raises(ValueError, match="result.json is not a gkpd bench file .missing ratio, "
                       "accuracy_after"):
        collect_rows(tmp_path)
