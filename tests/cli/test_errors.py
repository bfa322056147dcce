"""The CLI's one-line errors where a new user would otherwise meet a traceback: a missing
optional dependency, Ctrl-C during fine-tuning, --resume with other settings, and a model
given data with another number of channels."""

import json
import sys

import pytest
import torch
from testkit.cli import run, run_json

from gkpd import models
from gkpd.train import loop
from gkpd.train.checkpoint import load_state


def _finetune_args(compressed, data, out, *extra):
    return ["finetune", compressed, "--data", "fashion-mnist", "--data-dir", data,
            "--batch-size", "16", "--train-subset", "32", "--out", out, "--no-progress",
            "--device", "cpu", *extra]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_method_without_tensorly_names_the_extra(capsys, monkeypatch, workspace, tmp_path):
    _, _, teacher = workspace
    monkeypatch.setitem(sys.modules, "tensorly", None)  # `import tensorly` now fails
    code, _, err = run(capsys, "compress", teacher, "--ratio", "2", "--method", "tucker",
                       "--out", tmp_path / "out")
    assert code == 2
    assert "pip install 'gkpd[baselines]'" in _one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_onnx_export_without_onnx_names_the_extra(capsys, monkeypatch, compressed, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    code, _, err = run(capsys, "export", compressed, "--onnx", tmp_path / "m.onnx")
    assert code == 2
    assert "pip install 'gkpd[export]'" in _one_error_line(err)
    assert not (tmp_path / "m.onnx").exists()


def _interrupt_at(monkeypatch, epoch_index: int) -> None:
    """Ctrl-C as epoch ``epoch_index`` (0-based) starts."""
    train_epoch = loop._train_epoch

    def interrupted(session, epoch):
        if epoch == epoch_index:
            raise KeyboardInterrupt
        return train_epoch(session, epoch)

    monkeypatch.setattr(loop, "_train_epoch", interrupted)


def test_ctrl_c_during_finetune_keeps_the_checkpoint_and_says_how_to_resume(
    capsys, monkeypatch, workspace, compressed, tmp_path
):
    _, data, _ = workspace
    out = tmp_path / "ft"
    args = _finetune_args(compressed, data, out, "--epochs", "2")
    monkeypatch.setattr(sys, "argv", ["gkpd", *map(str, args)])
    _interrupt_at(monkeypatch, 1)
    code, _, err = run(capsys, *args)
    line = _one_error_line(err)
    assert code == 130
    assert f"checkpoint of epoch 1 is kept in {out / 'checkpoint.pt'}" in line
    assert line.endswith(" --epochs 2 --resume")
    assert load_state(out / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]

    monkeypatch.undo()
    result = run_json(capsys, *args, "--resume")
    assert result["epochs"] == 2


def test_ctrl_c_in_the_first_epoch_has_nothing_to_resume(
    capsys, monkeypatch, workspace, compressed, tmp_path
):
    _, data, _ = workspace
    _interrupt_at(monkeypatch, 0)
    code, _, err = run(capsys, *_finetune_args(compressed, data, tmp_path / "ft", "--epochs", "1"))
    assert code == 130 and "nothing to resume" in _one_error_line(err)


def test_resume_refuses_changed_settings_and_names_them(capsys, workspace, compressed, tmp_path):
    _, data, _ = workspace
    out = tmp_path / "ft"
    run_json(capsys, *_finetune_args(compressed, data, out, "--epochs", "1"))
    checkpoint = (out / "checkpoint.pt").read_bytes()
    args = _finetune_args(compressed, data, out, "--epochs", "1", "--resume", "--lr", "0.02")
    args[args.index("--train-subset") + 1] = "48"
    code, _, err = run(capsys, *args)
    line = _one_error_line(err)
    assert code == 2
    assert "--lr (lr): 0.01 recorded, 0.02 given" in line
    assert "--train-subset (samples_per_epoch): 32 recorded, 48 given" in line
    assert (out / "checkpoint.pt").read_bytes() == checkpoint


def test_data_with_other_channels_than_the_model_is_refused(capsys, workspace, compressed,
                                                            tmp_path):
    _, data, teacher = workspace
    code, _, err = run(capsys, "eval", teacher, "--data", "cifar10", "--no-progress")
    assert code == 2
    assert "the model takes 1-channel inputs, but --data cifar10 has 3-channel images" in (
        _one_error_line(err)
    )
    args = _finetune_args(compressed, data, tmp_path / "ft", "--epochs", "1")
    args[args.index("fashion-mnist")] = "cifar10"
    code, _, err = run(capsys, *args)
    assert code == 2 and "3-channel images" in _one_error_line(err)
    assert not (tmp_path / "ft").exists()
    # and the other way: a 3-channel model on 1-channel data
    rgb = tmp_path / "rgb"
    card = {"architecture": "resnet20", "model_kwargs": {"num_classes": 10, "in_channels": 3},
            "dataset": "cifar10", "input_size": [3, 32, 32]}
    torch.manual_seed(0)
    models.save_trained(rgb, models.create("resnet20", **card["model_kwargs"]), card)
    code, _, err = run(capsys, "eval", rgb, "--data", "fashion-mnist", "--data-dir", data)
    assert code == 2
    assert "takes 3-channel inputs, but --data fashion-mnist has 1-channel images; it was " \
           "trained on cifar10" in _one_error_line(err)


def test_resume_needs_a_run_and_force_starts_over_cleanly(capsys, monkeypatch, workspace,
                                                           compressed, tmp_path):
    _, data, teacher = workspace
    out = tmp_path / "ft"
    args = _finetune_args(compressed, data, out, "--epochs", "1")
    code, _, err = run(capsys, *args, "--resume")  # a mistyped --out: nothing to continue
    assert code == 2 and "holds no training run to continue" in _one_error_line(err)
    assert not out.exists()
    code, _, err = run(capsys, *args, "--resume", "--force")
    assert code == 2 and "pass one" in _one_error_line(err)
    run_json(capsys, *args)
    # --force, interrupted before its first epoch ended: the old model is gone with the old
    # run, not left beside the new run's files
    monkeypatch.setattr(sys, "argv", ["gkpd", *map(str, args), "--force"])
    _interrupt_at(monkeypatch, 0)
    code, _, err = run(capsys, *args, "--force")
    assert code == 130 and "nothing to resume" in _one_error_line(err)
    assert sorted(p.name for p in out.iterdir()) == []
    monkeypatch.undo()
    other = _finetune_args(compressed, data, out, "--epochs", "2")
    run_json(capsys, *other)
    code, _, err = run(capsys, *other, "--resume", "--teacher", compressed)
    assert code == 2 and "--teacher: the run distils from another teacher" in _one_error_line(err)
    code, _, err = run(capsys, *other, "--resume", "--no-distill")
    assert code == 2 and "--no-distill: the run was started with distillation" in (
        _one_error_line(err))


def test_gkpd_train_refuses_an_out_holding_a_model(capsys, workspace, compressed):
    _, data, _ = workspace
    before = sorted(p.name for p in compressed.iterdir())
    code, _, err = run(capsys, "train", "resnet20", "--data", "fashion-mnist", "--data-dir",
                       data, "--epochs", "1", "--out", compressed, "--no-progress")
    assert code == 2 and "already holds a model; pass --force" in _one_error_line(err)
    assert sorted(p.name for p in compressed.iterdir()) == before


def test_bad_numbers_devices_and_paths_are_one_line_errors(capsys, workspace, compressed,
                                                           tmp_path):
    _, data, _ = workspace
    file = tmp_path / "file"
    file.write_text("x")
    for extra, match in [
        (["--weight-decay", "nan"], "argument --weight-decay: expected a finite number >= 0"),
        (["--temperature", "inf"], "argument --temperature: expected a number > 0"),
        (["--alpha", "2"], "argument --alpha: expected a number in [0, 1]"),
        (["--workers", "-1"], "argument --workers: expected an integer >= 0"),
        (["--device", "nosuch"], "argument --device: expected a device such as cpu"),
    ]:
        args = _finetune_args(compressed, data, tmp_path / "ft", "--epochs", "1", *extra)
        if extra[0] == "--device":
            args = args[: args.index("--device")] + args[args.index("--device") + 2:]
        with pytest.raises(SystemExit) as exit_:  # argparse's usage line, then the error
            run(capsys, *args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err, extra
        assert match in err.strip().splitlines()[-1], extra
    code, _, err = run(capsys, *_finetune_args(compressed, data, file / "out", "--epochs", "1"))
    assert code == 2 and "is inside a file" in _one_error_line(err)
    assert not (tmp_path / "ft").exists()


def test_out_errors_name_the_flag_and_only_the_options_the_command_has(capsys, workspace,
                                                                       compressed, tmp_path):
    _, data, teacher = workspace
    held = tmp_path / "held"
    held.mkdir()
    (held / "checkpoint.pt").write_bytes(b"")
    code, _, err = run(capsys, "compress", teacher, "--ratio", "2", "--out", held)
    line = _one_error_line(err)
    assert code == 2 and "--out" in line and "--force" in line and "--resume" not in line
    code, _, err = run(capsys, "export", compressed, "--merge-out", held)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(f"gkpd export: error: --merge-out {held} already")
    args = _finetune_args(compressed, data, tmp_path / "ft", "--epochs", "1")
    args[args.index("--train-subset") + 1] = "100000"
    code, _, err = run(capsys, *args)
    assert code == 2 and "train_subset 100000 is more than the" in _one_error_line(err)


def test_eval_of_a_file_inside_a_save_reads_the_save(capsys, workspace, compressed):
    _, data, _ = workspace
    whole = run_json(capsys, "eval", compressed, "--data", "fashion-mnist", "--data-dir", data,
                     "--no-progress")
    for name in ("plan.json", "model.safetensors"):
        result = run_json(capsys, "eval", compressed / name, "--data", "fashion-mnist",
                          "--data-dir", data, "--no-progress")
        assert result["accuracy"] == whole["accuracy"]


def test_data_with_more_classes_than_the_model_has_outputs_is_refused():
    from gkpd.cli.common import CliError, check_classes

    card = {"model_kwargs": {"num_classes": 10}, "dataset": "cifar10"}
    with pytest.raises(CliError, match="--data cifar100 has 100 classes, but the model has 10 "
                       "outputs; it was trained on cifar10"):
        check_classes(card, object(), "cifar100")
    check_classes(card, object(), "cifar10")

    class Folder:
        classes = ["a", "b", "c"]

    check_classes(card, Folder(), "imagefolder")  # 3 labels fit 10 outputs


def test_gkpd_train_on_an_image_folder_has_its_classes(capsys, tmp_path):
    image = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        for i, name in enumerate(("cat", "dog", "eel")):
            for j in range(2):
                path = tmp_path / "data" / split / name / f"{j}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.new("RGB", (24, 24), (80 * i, 40 * j, 0)).save(path)
    out = tmp_path / "model"
    run_json(capsys, "train", "resnet20", "--data", "imagefolder", "--data-dir",
             tmp_path / "data", "--epochs", "1", "--batch-size", "2", "--out", out,
             "--no-progress", "--device", "cpu")
    card = json.loads((out / "model.json").read_text())
    assert card["model_kwargs"]["num_classes"] == 3


def test_a_data_loader_workers_error_is_its_last_line(capsys, monkeypatch):
    """With --workers, torch wraps a worker's error in a message holding the worker's whole
    traceback (torch.utils.data._utils.ExceptionWrapper): the CLI prints its last line."""
    import argparse

    from gkpd import cli

    def fails(args):
        raise ValueError(
            "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most "
            "recent call last):\n  File \"x.py\", line 1, in f\n    decode()\nValueError: "
            "image /data/val/cat/3.png is corrupt or truncated"
        )

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=fails, command="eval", verbose=False)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    assert capsys.readouterr().err == ("gkpd eval: error: ValueError: image /data/val/cat/3.png "
                                       "is corrupt or truncated\n")


def test_bench_speed_refuses_an_out_inside_a_file_before_timing(capsys, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a directory")
    code, _, err = run(capsys, "bench", "speed", "resnet32_fashion_mnist", "--out",
                       str(file / "out"))
    assert code == 2 and "--out" in err and "is inside a file" in _one_error_line(err)
