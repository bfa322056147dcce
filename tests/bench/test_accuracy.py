"""gkpd bench accuracy on a tiny fake Fashion-MNIST: outputs, resumption, failures, student."""

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from testkit.fake_data import write_fake_fashion_mnist
from torch import nn

import gkpd.bench.accuracy as accuracy
from gkpd import models
from gkpd.bench import AccuracyConfig, pick_student_widths, require_matplotlib
from gkpd.cli import main
from gkpd.models.pretrained import save_trained
from gkpd.train.finetune import finetune_loader

TESTS = Path(__file__).resolve().parents[1]
CARD = {
    "architecture": "resnet20",
    "model_kwargs": {"num_classes": 10, "in_channels": 1},
    "dataset": "fashion-mnist",
    "input_size": [1, 28, 28],
    "normalization": {"mean": [0.2860], "std": [0.3530]},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Fake data (48 train, 16 test images) and a random resnet20 saved as a trained model."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    data = write_fake_fashion_mnist(root / "data", n_train=48, n_test=16)
    torch.manual_seed(0)
    teacher = models.create("resnet20", **CARD["model_kwargs"])
    save_trained(root / "teacher", teacher, CARD)
    return root, data, root / "teacher"


def bench(workspace, out, *extra, methods="gkpd,student", ratios="5", epochs="1"):
    _, data, teacher = workspace
    argv = [
        "bench", "accuracy", str(teacher), "--data", "fashion-mnist", "--data-dir", str(data),
        "--methods", methods, "--ratios", ratios, "--epochs", epochs, "--batch-size", "16",
        "--out", str(out), "--no-progress", "--device", "cpu", *extra,
    ]
    return main(argv)


def test_writes_table_and_plot_then_does_not_retrain(workspace, capsys, monkeypatch):
    out = workspace[0] / "run"
    assert bench(workspace, out, "--json") == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for name in ("results.md", "results.json", "pareto.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cells = {c["method"]: c for c in results["cells"]}
    assert set(cells) == {"gkpd", "student"}
    dense = results["dense"]
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert cell["achieved_ratio"] == pytest.approx(5, rel=0.15)
        assert cell["params"] == pytest.approx(dense["params"] / 5, rel=0.15)
        assert 0 <= cell["accuracy_before"] <= 100 and 0 <= cell["accuracy_after"] <= 100
        assert cell["latency_ms"] > 0 and cell["finetune_seconds"] > 0 and cell["macs"] > 0
    assert cells["gkpd"]["macs"] < dense["macs"]
    assert (out / "gkpd-5x" / "model" / "plan.json").is_file()
    assert (out / "student-5x" / "model" / "model.json").is_file()
    table = (out / "results.md").read_text()
    assert "| gkpd | 5x |" in table and "| student | 5x |" in table and "| dense |" in table

    # the same command again: nothing is compressed or trained, the table is printed
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")}

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(accuracy, "finetune", forbidden)
    monkeypatch.setattr("gkpd.apply.compress", forbidden)
    assert bench(workspace, out) == 0
    printed = capsys.readouterr().out
    assert "| gkpd | 5x |" in printed and "written to" in printed
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == stamps

    # another budget in the same directory is refused, naming what changed
    assert bench(workspace, out, epochs="2") == 2
    assert "epochs 1 -> 2" in capsys.readouterr().err


def test_failed_cell_records_its_error_and_others_go_on(workspace, capsys, caplog):
    out = workspace[0] / "failing"
    assert bench(workspace, out, "--no-plot", methods="svd,student", ratios="40") == 0
    failed = json.loads((out / "svd-40x" / "result.json").read_text())
    assert failed["status"] == "failed" and failed["stage"] == "compress"
    assert "ratio 40" in failed["error"]
    assert json.loads((out / "student-40x" / "result.json").read_text())["status"] == "ok"
    table = (out / "results.md").read_text()
    assert "failed" in table and "svd at 40x failed" in table
    assert "1 cell(s) failed" in capsys.readouterr().out
    # a rerun tries the failed cell again (it may have failed for a reason since mended) and
    # leaves the finished one alone
    stamp = (out / "student-40x" / "result.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="gkpd.bench.accuracy"):
        assert bench(workspace, out, "--no-plot", methods="svd,student", ratios="40") == 0
    assert any("svd-40x: failed before" in r.getMessage() for r in caplog.records)
    assert (out / "student-40x" / "result.json").stat().st_mtime_ns == stamp


def test_interrupted_cell_resumes_from_its_checkpoint(workspace, monkeypatch, caplog,
                                                      capsys):
    out = workspace[0] / "interrupted"
    import gkpd.train.loop as loop

    real = loop.atomic_write_text

    def interrupt_after_first_checkpoint(*args, **kwargs):  # metrics follow the checkpoint
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "atomic_write_text", interrupt_after_first_checkpoint)
    assert bench(workspace, out, "--no-plot", methods="gkpd", epochs="2") == 130
    assert "finished cells are kept" in capsys.readouterr().err
    cell = out / "gkpd-5x"
    assert (cell / "finetune" / "checkpoint.pt").is_file()
    assert not (cell / "result.json").exists()
    monkeypatch.setattr(loop, "atomic_write_text", real)
    with caplog.at_level(logging.INFO, logger="gkpd.train.loop"):
        assert bench(workspace, out, "--no-plot", methods="gkpd", epochs="2") == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resumed")]
    assert len(resumed) == 1 and resumed[0].endswith("at epoch 1")
    result = json.loads((cell / "result.json").read_text())
    assert result["status"] == "ok" and result["epochs"] == 2


def test_feature_layers_reach_every_compressed_cell_and_the_budget(workspace, monkeypatch):
    out = workspace[0] / "features"
    asked = {}
    real = accuracy.finetune

    def recording(model, teacher, loader, **kwargs):
        asked[type(model).__name__ + str(sum(p.numel() for p in model.parameters()))] = (
            kwargs.get("feature_layers"), kwargs.get("feature_weight"))
        return real(model, teacher, loader, **kwargs)

    monkeypatch.setattr(accuracy, "finetune", recording)
    blocks = r"re:layer\d\.\d+"
    assert bench(workspace, out, "--no-plot", "--feature-layers", blocks, "--feature-weight",
                 "0.5", methods="gkpd,svd,student") == 0
    # the two compressed cells distil the blocks, the student (other widths) does not
    assert sorted(asked.values(), key=str) == sorted(
        [([blocks], 0.5), ([blocks], 0.5), (None, None)], key=str)
    budget = json.loads((out / "bench.json").read_text())["budget"]
    assert (budget["feature_layers"], budget["feature_weight"]) == ([blocks], 0.5)
    assert "and the outputs of " + blocks in (out / "results.md").read_text()
    # a budget without the option reads as before it existed: no feature keys at all
    assert "feature_layers" not in AccuracyConfig(("gkpd",), (5,), 1).budget()


def test_unknown_method_is_refused_before_any_work(workspace, capsys):
    out = workspace[0] / "unknown"
    assert bench(workspace, out, methods="gkpd,nonsense") == 2
    err = capsys.readouterr().err
    assert "nonsense" in err and "gkpd" in err and "student" in err and "svd" in err
    assert not out.exists()
    with pytest.raises(ValueError, match="unknown method"):
        AccuracyConfig(methods=("nonsense",), ratios=(5,), epochs=1).validate()
    with pytest.raises(ValueError, match="ratios"):
        AccuracyConfig(methods=("gkpd",), ratios=(0.5,), epochs=1).validate()


@pytest.mark.parametrize("ratio", [5, 10])
def test_student_is_within_15_percent_of_the_target(ratio):
    teacher = models.create("resnet32", num_classes=10, in_channels=1)
    dense = sum(p.numel() for p in teacher.parameters())
    widths, params = pick_student_widths(
        teacher, "resnet32", {"num_classes": 10, "in_channels": 1}, dense / ratio
    )
    assert params == pytest.approx(dense / ratio, rel=0.15)
    assert widths[0] <= widths[1] <= widths[2] < 64
    student = models.create("resnet32", num_classes=10, in_channels=1, widths=widths)
    assert sum(p.numel() for p in student.parameters()) == params


def test_student_needs_a_width_knob(workspace):
    _, data, _ = workspace
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    loader = finetune_loader("fashion-mnist", data, batch_size=16)
    with pytest.raises(ValueError, match="width knob"):
        accuracy.run_accuracy(
            teacher, torch.zeros(1, 1, 28, 28), train_loader=loader, test_loader=loader,
            config=AccuracyConfig(methods=("student",), ratios=(5,), epochs=1),
            out=workspace[0] / "no-knob", card={"architecture": "mlp"}, plot=False,
        )
    assert not (workspace[0] / "no-knob").exists()


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"gkpd\[plot\]"):
        require_matplotlib()


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def script():
    path = TESTS.parent / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_fashion_mnist_configuration(script):
    from gkpd.methods import method_names

    (step,) = script.commands(script.parse_args(["--out", "o"]))
    assert step[:4] == ["-v", "bench", "accuracy", "resnet32_fashion_mnist"]
    methods = step[step.index("--methods") + 1].split(",")
    assert methods == [*method_names(), "student"]
    assert step[step.index("--ratios") + 1] == "5,10"
    assert step[step.index("--out") + 1] == "o"


def test_script_paper_cifar10_trains_the_teacher_first(script, tmp_path, capsys):
    args = script.parse_args(["--paper-cifar10", "--data-dir", "D", "--out", str(tmp_path)])
    train, run = script.commands(args)
    assert train[:3] == ["-v", "train", "resnet32"] and "cifar10" in train
    assert train[train.index("--out") + 1] == str(tmp_path / "teacher")
    assert run[3] == str(tmp_path / "teacher")
    assert run[run.index("--methods") + 1] == "gkpd,tucker,tensor_train,tensor_ring"
    assert run[run.index("--ratios") + 1] == "5"
    reference = run[run.index("--reference") + 1]
    assert "dense=92.55" in reference and "gkpd=91.52" in reference and "tucker=87.7" in reference
    # a half-trained teacher is resumed; a given teacher skips training
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "checkpoint.pt").write_bytes(b"")
    assert "--resume" in script.commands(args)[0]
    (step,) = script.commands(
        script.parse_args(["--paper-cifar10", "--data-dir", "D", "--teacher", "T"])
    )
    assert step[3] == "T"
    assert script.main(["--paper-cifar10", "--data-dir", "D", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("gkpd ") >= 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--paper-cifar10"], "needs --data-dir"),
        (["--teacher", "T"], "belong to --paper-cifar10"),
        (["--paper-cifar10", "--data-dir", "D", "--train-subset", "5"], "Fashion-MNIST"),
        (["--epochs", "0"], "positive"),
    ],
)
def test_script_rejects_bad_arguments(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
