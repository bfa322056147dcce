"""gkpd bench speed on a tiny CNN: the table's structure and values, peers at the GKPD size,
the graph backends, peak memory, config and command-line validation, the script.

Over 400 lines: one file per benchmark module (tests/ mirrors src/gkpd/); its cases share
the tiny CNN and the fake timer.
"""

import importlib.util
import json
import logging
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from speed_models import INPUT, RATIO, tiny_cnn

from gkpd.bench.speed import (
    PEERS,
    RESULTS_JSON,
    RESULTS_MD,
    SpeedConfig,
    build_variants,
    format_table,
    run_speed,
    variants_at,
)
from gkpd.cli import main
from gkpd.models import create
from gkpd.models.pretrained import save_trained


def config(**changes) -> SpeedConfig:
    settings = dict(ratios=(RATIO,), batches=(1, 4), backends=("eager",), graph_ratios=None,
                    peers=(), peer_ratios=None, rounds=3, memory=False, latency_cache=None,
                    layouts=("contiguous",))
    return SpeedConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """One eager run with the three peers and peak memory; its result and output folder."""
    pytest.importorskip("tltorch")
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("speed")
    result = run_speed(tiny_cnn(), torch.zeros(1, *INPUT), out=out,
                       config=config(peers=PEERS, memory=True, extra={"model": "tiny"}))
    return result, out


def test_every_variant_is_timed_at_its_batches(eager):
    result, _ = eager
    variants = result["variants"]
    assert list(variants) == [
        "dense", "gkpd 2x (error)", "gkpd 2x (latency@b1)", "gkpd 2x (latency@b4)",
        "tltorch cp 2x", "tltorch tucker 2x", "tltorch tt 2x",
    ]
    both = {"eager@b1", "eager@b4"}
    for name, row in variants.items():
        expected = ({"eager@b1"} if name.endswith("@b1)") else
                    {"eager@b4"} if name.endswith("@b4)") else both)
        assert set(row["times_ms"]) == expected, name
        for key, timing in row["times_ms"].items():
            assert timing["ms"] > 0
            dense = variants["dense"]["times_ms"][key]["ms"]
            # both rounded: ms to 4 significant digits, the speed-up to 3 decimals
            assert timing["speedup"] == pytest.approx(dense / timing["ms"], rel=2e-3, abs=1e-3)
    for key in both:
        assert variants["dense"]["times_ms"][key]["speedup"] == 1.0
        assert variants_at(result, key)["dense"] == 1.0
    assert set(variants_at(result, "eager@b1")) == set(variants) - {"gkpd 2x (latency@b4)"}
    assert result["input_shape"] == list(INPUT)
    assert result["config"]["model"] == "tiny" and result["config"]["rounds"] == 3


def test_parameter_counts_hit_the_ratio(eager):
    variants = eager[0]["variants"]
    dense = variants["dense"]
    assert dense["params"] == sum(p.numel() for p in tiny_cnn().parameters())
    assert dense["ratio"] == 1.0
    gkpd_rows = {n: r for n, r in variants.items() if n.startswith("gkpd")}
    assert len(gkpd_rows) == 3
    for name, row in variants.items():
        if name != "dense":
            assert row["ratio"] == pytest.approx(RATIO, rel=0.1), name
            assert row["params"] == pytest.approx(dense["params"] / RATIO, rel=0.1), name
            assert row["ratio"] == pytest.approx(dense["params"] / row["params"], abs=1e-3)
    # the peers are sized like the GKPD layers they replace
    for factorization in PEERS:
        peer = variants[f"tltorch {factorization} 2x"]["params"]
        assert peer == pytest.approx(variants["gkpd 2x (error)"]["params"], rel=0.05)


def test_peak_memory_at_the_largest_batch(eager):
    variants = eager[0]["variants"]
    assert eager[0]["memory_batch"] == 4
    assert "peak_memory_mb" not in variants["gkpd 2x (latency@b1)"]
    for name, row in variants.items():
        if name != "gkpd 2x (latency@b1)":
            # weights and activations of this model are a few kB; a value inherited from
            # the (much larger) benchmark process would be tens of MB
            assert isinstance(row["peak_memory_mb"], float), name
            assert 0 <= row["peak_memory_mb"] < 5, name


def test_files_and_table(eager):
    result, out = eager
    assert json.loads((out / RESULTS_JSON).read_text()) == result
    table = (out / RESULTS_MD).read_text()
    assert table == format_table(result)
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary files
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header, body = rows[0], rows[1:]
    assert header == ("| variant | params | ratio | eager@b1 ms (×dense) | eager@b4 ms (×dense) "
                      "| peak MB @b4 |")
    assert [row.split(" | ")[0][2:] for row in body] == list(result["variants"])
    dense = body[0].split(" | ")
    assert dense[2] == "1.00" and "(1.00×)" in dense[3] and "(1.00×)" in dense[4]
    latency_b1 = body[2].split(" | ")
    assert latency_b1[4] == "–" and latency_b1[5] == "– |"
    assert "median of 3 interleaved rounds" in table
    assert result["malloc"].startswith("glibc malloc, freed memory kept")
    assert f"malloc: {result['malloc']}" in table
    assert f"OpenMP: {result['openmp']}" in table and result["openmp"]
    assert "- gkpd 2x (latency@b1): planned in" in table


def test_onnxruntime_backend(tmp_path):
    pytest.importorskip("onnxruntime")
    result = run_speed(tiny_cnn(), torch.zeros(1, *INPUT),
                       config=config(batches=(2,), backends=("eager", "onnxruntime")))
    for name, row in result["variants"].items():
        assert set(row["times_ms"]) == {"eager@b2", "onnxruntime@b2"}, name
        assert row["times_ms"]["onnxruntime@b2"]["ms"] > 0
    assert result["variants"]["dense"]["times_ms"]["onnxruntime@b2"]["speedup"] == 1.0


def test_onnxruntime_runs_channels_last_plans_but_not_dense_twice(tmp_path):
    pytest.importorskip("onnxruntime")
    cfg = config(batches=(2,), backends=("eager", "onnxruntime"), objectives=("latency",),
                 layouts=("channels_last",))
    variants = run_speed(tiny_cnn(), torch.zeros(1, *INPUT), config=cfg)["variants"]
    assert list(variants) == ["dense", "dense [channels_last]", "gkpd 2x (latency@b2)"
                              " [channels_last]"]
    # the exported graph has no layout: dense in channels_last is the dense model there
    assert set(variants["dense [channels_last]"]["times_ms"]) == {"eager@b2"}
    plan_times = variants["gkpd 2x (latency@b2) [channels_last]"]["times_ms"]
    assert plan_times["onnxruntime@b2"]["ms"] > 0


def test_compile_backend_only_for_graph_ratios(tmp_path):
    # graph_ratios=(): only the dense model is compiled (one small graph, a few seconds)
    result = run_speed(tiny_cnn(), torch.zeros(1, *INPUT), out=tmp_path,
                       config=config(batches=(1,), backends=("eager", "compile"),
                                     graph_ratios=()))
    variants = result["variants"]
    assert set(variants["dense"]["times_ms"]) == {"eager@b1", "compile@b1"}
    assert variants["dense"]["times_ms"]["compile@b1"]["speedup"] == 1.0
    for name in ("gkpd 2x (error)", "gkpd 2x (latency@b1)"):
        assert set(variants[name]["times_ms"]) == {"eager@b1"}
    assert "compile@b1 ms (×dense)" in (tmp_path / RESULTS_MD).read_text()


def test_run_keeps_every_variant_compiled_past_dynamos_recompile_limit(monkeypatch):
    import torch._dynamo
    import torch._dynamo.config as dynamo_config

    from gkpd.bench import speed

    def compiles(n_shapes: int) -> int:
        graphs = []

        def counting_backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        def double(x):
            return x * 2

        torch._dynamo.reset()
        compiled = torch.compile(double, backend=counting_backend, dynamic=False)
        for n in range(1, n_shapes + 1):
            compiled(torch.ones(n))
        return len(graphs)

    assert compiles(12) == dynamo_config.recompile_limit == 8  # past 8: eager, silently
    with speed._unlimited_recompiles():
        assert compiles(12) == 12
    assert dynamo_config.recompile_limit == 8
    seen = []
    monkeypatch.setattr(speed, "_call", lambda model, x, *args: (
        seen.append(dynamo_config.recompile_limit), lambda: model(x))[1])
    run_speed(tiny_cnn(), torch.zeros(1, *INPUT), config=config(batches=(1,)))
    assert seen and set(seen) == {speed._RECOMPILES}
    torch._dynamo.reset()


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the run itself uses 1 thread: two would be slow on a busy box
    try:
        result = run_speed(tiny_cnn(), torch.zeros(1, *INPUT),
                           config=config(batches=(1,), threads=1))
        assert result["device"].endswith(" 1 torch thread(s)")
        assert result["config"]["threads"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"ratios": (1.0,)}, "ratios"),
        ({"ratios": ()}, "ratios"),
        ({"ratios": (2.0, 2.0)}, "ratios"),
        ({"ratios": ("2",)}, "ratios"),
        ({"batches": (0,)}, "batches"),
        ({"batches": (True,)}, "batches"),
        ({"batches": (1.5,)}, "batches"),
        ({"objectives": ("speed",)}, "objectives"),
        ({"objectives": ()}, "objectives"),
        ({"backends": ("gpu",)}, "backends"),
        ({"backends": ()}, "backends"),
        ({"backends": "eager"}, "backends"),
        ({"peers": ("svd",)}, "peers"),
        ({"backends": ("compile",), "graph_ratios": (5.0,)}, "graph_ratios"),
        ({"peers": ("cp",), "peer_ratios": (5.0,)}, "peer_ratios"),
        ({"rounds": 2}, "rounds"),
        ({"rounds": 3.0}, "rounds"),
        ({"threads": 0}, "threads"),
        ({"memory": "yes"}, "memory"),
        ({"latency_cache": 3}, "latency_cache"),
        ({"latency_slacks": ()}, "latency_slacks"),
        ({"latency_slacks": (-0.1,)}, "latency_slacks"),
        ({"layouts": ("nhwc",)}, "layouts"),
        ({"layouts": ()}, "layouts"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        run_speed(tiny_cnn(), torch.zeros(1, *INPUT), config=config(**changes))


def test_objectives_choose_the_gkpd_plans():
    pytest.importorskip("tltorch")
    only_error = build_variants(tiny_cnn(), torch.zeros(1, *INPUT),
                                config(objectives=("error",), peers=("cp",)))
    assert [v.name for v in only_error] == ["dense", "gkpd 2x (error)", "tltorch cp 2x"]
    # the peers are sized by the error plan even where its variant is not timed
    only_latency = build_variants(tiny_cnn(), torch.zeros(1, *INPUT),
                                  config(objectives=("latency",), peers=("cp",)))
    assert [v.name for v in only_latency] == [
        "dense", "gkpd 2x (latency@b1)", "gkpd 2x (latency@b4)", "tltorch cp 2x",
    ]
    assert only_latency[-1].params == only_error[-1].params
    assert [v.batch for v in only_latency] == [None, 1, 4, None]


def test_latency_plans_per_slack_run_in_the_layout_they_chose(tmp_path):
    cfg = config(objectives=("latency",), batches=(4,), latency_slacks=(0.0, 0.5),
                 layouts=("contiguous", "channels_last"))
    result = run_speed(tiny_cnn(), torch.zeros(1, *INPUT), config=cfg, out=tmp_path)
    names = list(result["variants"])
    assert names[:2] == ["dense", "dense [channels_last]"] and len(names) == 4
    for name, slack in zip(names[2:], ("0", "0.5"), strict=True):
        # one plan per slack, named by the layout it chose
        assert re.fullmatch(rf"gkpd 2x \(latency@b4, slack {slack}\)( \[channels_last\])?", name)
        assert "runs in " in result["variants"][name]["notes"]
    for name, row in result["variants"].items():
        assert isinstance(row["times_ms"]["eager@b4"], dict), name
    assert result["variants"]["dense [channels_last]"]["ratio"] == 1.0
    variants = build_variants(tiny_cnn(), torch.zeros(1, *INPUT), cfg)
    x = torch.randn(4, *INPUT)
    dense = variants[0].model(x)
    # only the dense model gets channels_last inputs; the plans convert NCHW ones themselves
    assert [v.channels_last for v in variants] == [False, True, False, False]
    weight = variants[1].model[0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(variants[1].model(x), dense)
    for v in variants[2:]:
        assert v.model(x).shape == dense.shape


def test_cli_latency_slacks_and_layouts(saved_resnet, tmp_path, capsys, monkeypatch):
    argv = ["bench", "speed", str(saved_resnet), "--out", str(tmp_path), "--ratios", "2",
            "--batches", "2", "--backends", "eager", "--peers", "none", "--rounds", "3",
            "--objectives", "latency", "--latency-slacks", "0.2", "--layouts", "channels_last",
            "--latency-cache", "none", "--no-memory", "--json"]
    monkeypatch.setattr(sys, "argv", ["gkpd", *argv])
    assert main(argv) == 0
    # the files say what produced them
    command = "gkpd " + " ".join(shlex.quote(a) for a in argv)
    assert (tmp_path / "speed.md").read_text().startswith(f"Command: `{command}`\n\nInput ")
    assert json.loads((tmp_path / "speed.json").read_text())["config"]["command"] == command
    variants = json.loads((tmp_path / "speed.json").read_text())["variants"]
    assert list(variants) == ["dense", "dense [channels_last]",
                              "gkpd 2x (latency@b2) [channels_last]"]
    for bad, message in ((["--latency-slacks", "-1"], "argument --latency-slacks"),
                         (["--layouts", "nhwc"], "argument --layouts")):
        with pytest.raises(SystemExit):
            main(["bench", "speed", str(saved_resnet), "--out", str(tmp_path), *bad])
        assert message in capsys.readouterr().err


def test_unused_ratio_subsets_are_not_checked():
    # eager only and no peers: graph_ratios and peer_ratios do not matter
    config(graph_ratios=(5.0,), peer_ratios=(5.0,)).validate()


@pytest.fixture
def without(monkeypatch):
    """``without("onnxruntime")``: the module cannot be found."""
    find_spec = importlib.util.find_spec

    def hide(*names):
        def find(name, *args, **kwargs):
            return None if name in names else find_spec(name, *args, **kwargs)

        monkeypatch.setattr(importlib.util, "find_spec", find)

    return hide


def test_missing_optional_packages_say_how_to_install(without, saved_resnet, tmp_path, capsys):
    without("onnxruntime", "tltorch")
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        run_speed(tiny_cnn(), torch.zeros(1, *INPUT), config=config(backends=("onnxruntime",)))
    with pytest.raises(ImportError, match="pip install tensorly-torch"):
        run_speed(tiny_cnn(), torch.zeros(1, *INPUT), config=config(peers=("cp",)))
    argv = ["bench", "speed", str(saved_resnet), "--out", str(tmp_path), "--peers", "none"]
    assert main(argv) == 2
    assert "--backends onnxruntime needs onnxruntime" in capsys.readouterr().err
    assert main([*argv[:-2], "--backends", "eager"]) == 2
    assert "--peers cp,tucker,tt needs tltorch: pip install tensorly-torch" in (
        capsys.readouterr().err)


def test_example_input_must_be_a_tensor():
    with pytest.raises(TypeError, match="example_input must be a tensor .* got list"):
        run_speed(tiny_cnn(), [[0.0]], config=config())


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def saved_resnet(tmp_path_factory):
    """A random resnet20 saved as a trained model whose card says 3x8x8 inputs."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("resnet") / "model"
    card = {"architecture": "resnet20", "model_kwargs": {"num_classes": 10},
            "input_size": [3, 8, 8]}
    save_trained(folder, create("resnet20", num_classes=10), card)
    return folder


def test_cli_writes_the_table(saved_resnet, tmp_path, capsys):
    pytest.importorskip("tltorch")
    out, cache = tmp_path / "out", tmp_path / "cache.json"
    argv = ["bench", "speed", str(saved_resnet), "--ratios", "2", "--batches", "2",
            "--backends", "eager", "--peers", "tt", "--rounds", "3", "--threads", "1",
            "--no-memory", "--latency-cache", str(cache), "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads((out / RESULTS_JSON).read_text())
    names = list(result["variants"])  # by default the dense model in both layouts, and
    # each plan in the one it chose
    assert names[:2] == ["dense", "dense [channels_last]"]
    assert names[2] in ("gkpd 2x (error)", "gkpd 2x (error) [channels_last]")
    assert names[3] in ("gkpd 2x (latency@b2)", "gkpd 2x (latency@b2) [channels_last]")
    assert names[4:] == ["tltorch tt 2x"]
    assert result["input_shape"] == [3, 8, 8] and result["memory_batch"] is None
    assert result["config"]["model"] == str(saved_resnet.resolve())
    assert result["config"]["latency_cache"] == str(cache)
    assert json.loads(cache.read_text())["entries"]  # the latency plan's timings were kept
    for row in result["variants"].values():
        assert set(row["times_ms"]) == {"eager@b2"} and "peak_memory_mb" not in row
    assert "peak MB" not in (out / RESULTS_MD).read_text()


def test_cli_times_an_architecture_with_random_weights(tmp_path, capsys, caplog):
    argv = ["bench", "speed", "resnet20", "--input-size", "3,8,8", "--ratios", "2",
            "--batches", "1", "--backends", "eager", "--peers", "none", "--rounds", "3",
            "--no-memory", "--latency-cache", "none", "--out", str(tmp_path)]
    with caplog.at_level(logging.WARNING, logger="gkpd"):
        assert main(argv) == 0
    assert "random weights" in caplog.text
    printed = capsys.readouterr().out
    assert "| dense | " in printed and f"written to {tmp_path}" in printed
    assert (tmp_path / RESULTS_JSON).is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batches", "0"], "argument --batches"),
        (["--batches", "1,1"], "argument --batches"),
        (["--backends", "gpu"], "argument --backends"),
        (["--objectives", "fast"], "argument --objectives"),
        (["--peers", "svd"], "argument --peers"),
        (["--rounds", "2"], "argument --rounds"),
        (["--threads", "0"], "argument --threads"),
        (["--ratios", "1"], "argument --ratios"),
        (["--input-size", "3,x"], "argument --input-size"),
        (["--latency-cache", "."], "argument --latency-cache"),
    ],
)
def test_cli_bad_arguments_exit_naming_them(saved_resnet, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "speed", str(saved_resnet), "--out", str(tmp_path), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "model, extra, message",
    [
        (None, ["--ratios", "2", "--graph-ratios", "5"], "--graph-ratios: 5 not among --ratios"),
        (None, ["--ratios", "2", "--peer-ratios", "3"], "--peer-ratios: 3 not among --ratios"),
        (None, ["--ratios", "2,2", "--peers", "none"], "--ratios must be"),
        (None, ["--input-size", "1,8,8"], "does not run on an input of shape (1, 8, 8)"),
        ("resnet50", [], "give its input with --input-size"),
        ("no_such_model", [], "neither an existing path"),
    ],
)
def test_cli_bad_values_are_refused_before_any_work(saved_resnet, tmp_path, capsys, model,
                                                     extra, message):
    argv = ["bench", "speed", model or str(saved_resnet), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gkpd bench speed: error: ") and message in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the script


@pytest.fixture(scope="module")
def script():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def option(step: list[str], name: str) -> str | None:
    return step[step.index(name) + 1] if name in step else None


def test_script_default_run_is_the_shipped_resnet32(script):
    step = script.command(script.parse_args([]))
    assert step[:4] == ["-v", "bench", "speed", "resnet32_fashion_mnist"]
    assert option(step, "--out") == str(script.HERE / "speed_fashion_mnist")
    assert option(step, "--ratios") == "2,5,10" and option(step, "--batches") == "1,64"
    assert option(step, "--graph-ratios") == "5" and option(step, "--peer-ratios") == "5"
    assert option(step, "--threads") == "2"  # this machine's two cores
    assert option(step, "--layouts") == "contiguous,channels_last"
    assert option(step, "--latency-slacks") == "0.3"
    # the command it builds parses
    from gkpd.cli import build_parser

    assert build_parser().parse_args(step).ratios == [2.0, 5.0, 10.0]


def test_script_resnet50(script, capsys):
    argv = ["resnet50", "--input-size", "3,224,224", "--ratios", "2", "--batches", "8"]
    assert option(script.command(script.parse_args(argv)), "--objectives") is None
    argv += ["--objectives", "error"]
    step = script.command(script.parse_args(argv))
    assert option(step, "--objectives") == "error"
    assert step[3] == "resnet50" and option(step, "--input-size") == "3,224,224"
    assert option(step, "--ratios") == "2" and option(step, "--batches") == "8"
    assert option(step, "--graph-ratios") is None and option(step, "--peer-ratios") is None
    assert option(step, "--out") == str(script.HERE / "speed_resnet50")
    assert script.main([*argv, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("gkpd -v bench speed resnet50 ")
