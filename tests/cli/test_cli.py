"""gkpd compress / finetune / summary (and eval of a compressed model) on a tiny fake data set."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from testkit.cli import run, run_json

from gkpd import io, models
from gkpd.cli import main
from gkpd.layout import layout_of
from gkpd.plan.schema import CompressionPlan
from gkpd.resolve import resolve_model


@pytest.mark.parametrize("command", ["compress", "finetune", "summary"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: gkpd " + command in capsys.readouterr().out


@pytest.mark.parametrize("ratio", ["1", "0.5", "-3", "abc"])
def test_compress_rejects_ratio(capsys, tmp_path, ratio):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "resnet32_fashion_mnist", "--ratio", ratio, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--ratio" in capsys.readouterr().err


def test_compress_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "compress", tmp_path / "nope", "--ratio", 5, "--out", tmp_path / "o")
    assert code == 2 and "neither an existing path" in err
    assert not (tmp_path / "o").exists()


def test_compress_writes_a_loadable_model(capsys, workspace, compressed):
    root, data, teacher = workspace
    plan = CompressionPlan.load(compressed / "plan.json")
    assert abs(plan.achieved_ratio - 2) / 2 <= 0.03
    card = io.read_card(compressed)
    assert card["architecture"] == "resnet20" and card["input_size"] == [1, 28, 28]
    assert card["teacher"]["model"] == str(teacher.resolve())
    assert card["compression"]["params"] == plan.params
    # summary counts what the plan says
    result = run_json(capsys, "summary", compressed)
    assert result["total_params"] == plan.params
    assert result["dense_params"] == plan.dense_params
    assert result["kronecker_layers"] == len(plan.compressed_layers)
    assert result["layout"] == plan.layout and result["allocator"]
    # the error plan ran its model in each layout and keeps the faster, as the loaded one
    assert plan.layout in plan.options["model_latency"]["ms"]
    assert layout_of(resolve_model(str(compressed))[0]) == plan.layout
    code, text, _ = run(capsys, "summary", compressed)
    assert code == 0 and "Kronecker" in text and f"{plan.params:,}" in text
    assert "\nallocator: " in text and "\nOpenMP: " in text and result["openmp"]
    # eval reads a compressed directory too
    result = run_json(
        capsys, "eval", compressed, "--data", "fashion-mnist", "--data-dir", data, "--no-progress"
    )
    assert result["count"] == 32 and 0 <= result["accuracy"] <= 100


def test_compress_json_and_table(capsys, workspace, tmp_path):
    _, _, teacher = workspace
    out = tmp_path / "c"
    code, text, err = run(
        capsys,
        "compress",
        teacher,
        "--ratio",
        2,
        "--strategy",
        "global",
        "--exclude",
        "fc",
        "--out",
        out,
    )
    assert code == 0, err
    assert "written to" in text and "layer1.0.conv1" in text
    plan = CompressionPlan.load(out / "plan.json")
    assert plan.strategy == "global" and not plan.layer("fc").compressed


def test_compress_with_calibration_images(capsys, workspace, tmp_path):
    _, data, teacher = workspace
    out = tmp_path / "c"
    result = run_json(capsys, "compress", teacher, "--ratio", 2, "--calibration", 16,
                      "--data-dir", data, "--out", out)
    assert result["achieved_ratio"] == pytest.approx(2, rel=0.03)
    plan = CompressionPlan.load(out / "plan.json")
    assert plan.options["calibration"] == {"samples": 16, "damping": 0.01,
                                           "sequential": False, "select": False}
    assert all(e.settings["init"] == "whitened" for e in plan.compressed_layers)
    # the saved model loads without the data
    assert run_json(capsys, "eval", out, "--data", "fashion-mnist", "--data-dir", data,
                    "--no-progress")["count"] == 32


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--calibration", "-1"], "--calibration must be"),
        (["--calibration-sequential"], "need --calibration N"),
        (["--calibration", "8", "--method", "tucker"], "--method gkpd or svd only"),
    ],
)
def test_compress_rejects_calibration_options(capsys, workspace, tmp_path, argv, message):
    _, data, teacher = workspace
    code, _, err = run(capsys, "compress", teacher, "--ratio", 2, "--data-dir", data,
                       *argv, "--out", tmp_path / "c")
    assert code == 2 and message in err


def test_compress_latency_objective(capsys, workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("GKPD_CACHE_DIR", str(tmp_path / "cache"))
    _, _, teacher = workspace
    out = tmp_path / "fast"
    code, _, err = run(capsys, "compress", teacher, "--ratio", 2, "--objective", "latency",
                       "--latency-batch", 2, "--latency-slack", 0, "--channels-last",
                       "--out", out)
    assert code == 0, err
    plan = CompressionPlan.load(out / "plan.json")
    assert plan.objective == "latency"
    assert plan.options["latency_batch"] == 2 and plan.options["latency_slack"] == 0
    assert plan.options["latency_layout"] == plan.layout == "channels_last"
    card = io.read_card(out)
    assert card["compression"]["objective"] == "latency"
    assert card["compression"]["latency_layout"] == "channels_last"
    assert (tmp_path / "cache" / "latency.json").is_file()
    loaded, _ = resolve_model(str(out))
    for entry in plan.compressed_layers:  # the timed paths come back pinned
        assert loaded.get_submodule(entry.name).path == entry.settings["path"]
    assert layout_of(loaded) == "channels_last"  # and the layout they were timed in


@pytest.mark.parametrize("argv, message", [
    (["--latency-slack", "-1"], "--latency-slack"),
    (["--latency-slack", "x"], "--latency-slack"),
    (["--objective", "speed"], "--objective"),
])
def test_compress_rejects_latency_options(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "resnet32_fashion_mnist", "--ratio", "2", "--out", str(tmp_path / "o"),
              *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_compress_latency_options_need_the_latency_objective(capsys, tmp_path):
    code, _, err = run(capsys, "compress", "resnet32_fashion_mnist", "--ratio", 2,
                       "--latency-batch", 4, "--out", tmp_path / "o")
    assert code == 2 and "--objective latency" in err
    assert not (tmp_path / "o").exists()


def test_compress_layout(capsys, workspace, tmp_path):
    _, _, teacher = workspace
    code, _, err = run(capsys, "compress", teacher, "--ratio", 2, "--channels-last",
                       "--out", tmp_path / "cl")
    assert code == 0, err
    plan = CompressionPlan.load(tmp_path / "cl" / "plan.json")
    assert plan.objective == "error" and plan.layout == "channels_last"
    assert "model_latency" not in plan.options  # asked for, not timed
    assert layout_of(resolve_model(str(tmp_path / "cl"))[0]) == "channels_last"
    code, _, err = run(capsys, "compress", teacher, "--ratio", 2, "--channels-last",
                       "--layout", "contiguous", "--out", tmp_path / "o")
    assert code == 2 and "--channels-last contradicts --layout contiguous" in err
    assert not (tmp_path / "o").exists()


def test_compress_refuses_to_overwrite(capsys, workspace, compressed):
    _, _, teacher = workspace
    manifest = (compressed / "manifest.json").read_bytes()
    code, _, err = run(capsys, "compress", teacher, "--ratio", 2, "--out", compressed)
    assert code == 2 and "already holds a model" in err and "--force" in err
    assert (compressed / "manifest.json").read_bytes() == manifest
    # the teacher's own directory is never an output
    code, _, err = run(capsys, "compress", teacher, "--ratio", 2, "--out", teacher, "--force")
    assert code == 2 and "is an input" in err
    # a compressed model is not compressed again
    code, _, err = run(capsys, "compress", compressed, "--ratio", 2, "--out", compressed / "x")
    assert code == 2 and "already compressed" in err


def test_compress_force_replaces(capsys, workspace, tmp_path):
    _, _, teacher = workspace
    out = tmp_path / "c"
    assert run(capsys, "compress", teacher, "--ratio", 2, "--out", out)[0] == 0
    code, _, err = run(capsys, "compress", teacher, "--ratio", 3, "--out", out, "--force")
    assert code == 0, err
    assert CompressionPlan.load(out / "plan.json").target_ratio == 3


def test_finetune_with_distillation_and_resume(capsys, workspace, compressed, tmp_path):
    root, data, teacher = workspace
    out = tmp_path / "ft"
    args = [
        "finetune",
        compressed,
        "--data",
        "fashion-mnist",
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--train-subset",
        "48",
        "--out",
        out,
        "--no-progress",
        "--device",
        "cpu",
    ]
    result = run_json(capsys, *args)  # teacher taken from the compressed model's card
    assert result["epochs"] == 1 and result["distillation"]
    card = io.read_card(out)
    assert card["finetune"]["teacher"] == str(teacher.resolve())
    assert card["test_accuracy"] == result["test_accuracy"]
    assert (out / "checkpoint.pt").is_file() and (out / "plan.json").is_file()
    # the result is a loadable model
    result2 = run_json(
        capsys, "eval", out, "--data", "fashion-mnist", "--data-dir", data, "--no-progress"
    )
    assert result2["accuracy"] == pytest.approx(result["test_accuracy"])
    # a second run into the same --out needs --resume (or --force)
    code, _, err = run(capsys, *args)
    assert code == 2 and "--resume" in err
    resumed = run_json(capsys, *args, "--resume")
    assert resumed["test_accuracy"] == pytest.approx(result["test_accuracy"])


def test_finetune_without_distillation(capsys, workspace, compressed, tmp_path):
    _, data, _ = workspace
    result = run_json(
        capsys,
        "finetune",
        compressed,
        "--data",
        "fashion-mnist",
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--train-subset",
        "16",
        "--no-distill",
        "--teacher",
        tmp_path / "does-not-matter",
        "--out",
        tmp_path / "ft",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert not result["distillation"]
    assert io.read_card(tmp_path / "ft")["finetune"]["teacher"] is None


def test_finetune_takes_the_learning_rate_of_the_plans_methods(capsys, workspace, compressed,
                                                             tmp_path):
    _, data, teacher = workspace
    cp = tmp_path / "cp"
    run_json(capsys, "compress", teacher, "--ratio", "1.5", "--method", "cp", "--out", cp)
    common = ["--data", "fashion-mnist", "--data-dir", data, "--epochs", "1", "--batch-size",
              "16", "--train-subset", "16", "--no-progress"]
    for model, flags, lr in [(cp, [], 0.001), (compressed, [], 0.01), (cp, ["--lr", "0.02"], 0.02)]:
        out = tmp_path / f"ft{len(list(tmp_path.iterdir()))}"
        run_json(capsys, "finetune", model, *common, *flags, "--out", out)
        assert io.read_card(out)["finetune"]["lr"] == lr
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", str(cp), *map(str, common), "--lr", "-1", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--lr: expected a number > 0, got '-1'" in capsys.readouterr().err


def test_finetune_distils_the_blocks_outputs_with_feature_layers(capsys, workspace, compressed,
                                                                 tmp_path):
    _, data, _ = workspace
    common = ["finetune", compressed, "--data", "fashion-mnist", "--data-dir", data, "--epochs",
              "1", "--batch-size", "16", "--train-subset", "16", "--no-progress"]
    blocks = r"re:layer\d\.\d+"
    run_json(capsys, *common, "--feature-layers", blocks, "--feature-weight", "0.5",
             "--out", tmp_path / "ft")
    recorded = io.read_card(tmp_path / "ft")["finetune"]
    assert (recorded["feature_layers"], recorded["feature_weight"]) == ([blocks], 0.5)
    code, _, err = run(capsys, *common, "--feature-layers", "blocks", "--out", tmp_path / "x")
    assert code == 2 and "'blocks' names no module" in err
    code, _, err = run(capsys, *common, "--feature-layers", blocks, "--no-distill",
                       "--out", tmp_path / "y")
    assert code == 2 and "drop --no-distill" in err


def test_finetune_rejects_a_dense_model_and_bad_teacher(capsys, workspace, compressed, tmp_path):
    _, data, teacher = workspace
    common = ["--data", "fashion-mnist", "--data-dir", data, "--epochs", "1", "--no-progress"]
    out = ["--out", tmp_path / "ft"]
    code, _, err = run(capsys, "finetune", teacher, "--teacher", teacher, *common, *out)
    assert code == 2 and "not a compressed model" in err
    code, _, err = run(capsys, "finetune", compressed, "--teacher", tmp_path / "no", *common, *out)
    assert code == 2 and "neither an existing path" in err
    code, _, err = run(capsys, "finetune", compressed, *common, "--out", compressed, "--force")
    assert code == 2 and "is an input" in err
    assert not (tmp_path / "ft").exists()
    # nor the teacher's directory: --force once wrote the student over it
    own_teacher = tmp_path / "teacher"
    shutil.copytree(teacher, own_teacher)
    before = sorted(p.name for p in own_teacher.iterdir())
    code, _, err = run(capsys, "finetune", compressed, "--teacher", own_teacher, *common,
                       "--out", own_teacher, "--force")
    assert code == 2 and "is an input" in err
    assert sorted(p.name for p in own_teacher.iterdir()) == before


def test_summary_of_a_dense_checkpoint(capsys, workspace):
    _, _, teacher = workspace
    result = run_json(capsys, "summary", teacher)
    assert result["kronecker_layers"] == 0
    dense = models.create("resnet20", num_classes=10, in_channels=1)
    assert result["total_params"] == sum(p.numel() for p in dense.parameters())
    code, _, err = run(capsys, "summary", "no-such-model")
    assert code == 2 and "no-such-model" in err


def test_main_job_script_end_to_end(workspace, tmp_path):
    """scripts/main_job.py on the tiny teacher and fake data: every step runs, reports exist."""
    import os
    import subprocess

    _, data, teacher = workspace
    script = Path(__file__).parents[2] / "scripts" / "main_job.py"
    out = tmp_path / "main"
    subprocess.run(
        [
            sys.executable,
            str(script),
            "--teacher",
            str(teacher),
            "--data-dir",
            str(data),
            "--ratio",
            "2",
            "--epochs",
            "1",
            "--train-subset",
            "32",
            "--batch-size",
            "16",
            "--latency-repeats",
            "1",
            "--objective",
            "error",  # the default, latency, times every layer: its call is tested in-process
            "--out",
            str(out),
            "--no-progress",
        ],
        check=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    report = json.loads((out / "report.json").read_text())
    assert set(report["accuracy"]) >= {"dense", "before_finetune", "after_finetune"}
    assert report["size"]["param_ratio"] == pytest.approx(2, rel=0.03)
    size = report["size"]
    assert size["bytes"] == (out / "finetuned" / "model.safetensors").stat().st_size
    assert size["dense_bytes"] == (teacher / "model.safetensors").stat().st_size
    assert size["bytes_ratio"] == pytest.approx(size["dense_bytes"] / size["bytes"])
    assert 1.5 < size["bytes_ratio"] < 2.5  # about the parameter ratio: 4 bytes a parameter
    assert report["finetune"]["images_per_epoch"] == [32]
    assert report["latency"]["batch_64"]["dense"] > 0
    assert "--objective error" in report["commands"]["compress"]
    # the dense model is timed in both layouts and counted in the faster
    for batch in ("batch_1", "batch_64"):
        timed = report["latency"][batch]
        assert timed["dense"] == min(timed["dense_by_layout"].values())
        assert timed["dense_layout"] in timed["dense_by_layout"]
    assert "gkpd finetune" in report["longer_run"]
    text = (out / "report.md").read_text()
    assert "A longer, better run" in text and "| 64 |" in text
    assert "planned for the least error" in text
    assert f"| weights file (bytes) | {size['dense_bytes']:,} | {size['bytes']:,} |" in text
    machine = report["machine"]
    assert set(machine["other_processes_cores"]) == {"dense_evaluation", "planning",
                                                     "fine_tuning", "latency"}
    # the test sets OMP_NUM_THREADS: a user's choice, never changed
    assert machine["threads"] == {"started": 1, "used": 1, "chosen_by_user": True}
    assert machine["busy_steps"] == [step for step, cores in
                                     machine["other_processes_cores"].items()
                                     if cores is not None and cores >= machine["busy_cores"]]
    assert "Cores other processes kept busy on average — dense evaluation " in text
    assert ("**The machine was busy**" in text) == bool(machine["busy_steps"])
    assert io.is_saved_model(out / "finetuned")
