"""gkpd.io.save / load: round trip in a fresh process, corrupt files, wrong architectures."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from gkpd import io, models
from gkpd.counting import count_model
from gkpd.files import file_sha256
from gkpd.layers import KroneckerConv2d, KroneckerLinear
from gkpd.plan.schema import CompressionPlan, LayerPlan

# layer name -> (a_shape, rank) of a small hand-written plan for resnet20 (1 input channel)
CHOICES = {
    "layer1.0.conv1": ((4, 4, 3, 1), 3),
    "layer2.1.conv2": ((8, 4, 1, 3), 2),
    "fc": ((2, 8), 2),
}
ARCH = {"architecture": "resnet20", "model_kwargs": {"num_classes": 10, "in_channels": 1}}


def dense_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = models.create("resnet20", **{**ARCH["model_kwargs"], **kwargs})
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that buffers matter
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def example():
    return torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def compress_by_hand(model, choices=CHOICES):
    """Swap layers for Kronecker layers and write the matching plan (independent of the
    planner, so that these tests exercise only save/load and apply_(decompose=False))."""
    x = example()
    dense = count_model(model, x)
    modules = dict(model.named_modules())
    entries = []
    for c in dense.layers:
        module = modules[c.name]
        entry = LayerPlan(
            name=c.name,
            module_type=type(module).__name__,
            weight_shape=tuple(module.weight.shape),
            input_shape=c.input_shape,
            dense_params=c.params,
            dense_macs=c.macs,
            params=c.params,
            macs=c.macs,
        )
        if c.name in choices:
            a_shape, rank = choices[c.name]
            cls = KroneckerLinear if isinstance(module, torch.nn.Linear) else KroneckerConv2d
            layer = cls.from_dense(module, a_shape=a_shape, rank=rank).train(module.training)
            parent, _, child = c.name.rpartition(".")
            setattr(modules[parent] if parent else model, child, layer)
            entry.method = "gkpd"
            entry.settings = {"a_shape": list(layer.a_shape), "b_shape": list(layer.b_shape),
                              "rank": layer.rank, "path": layer.resolve_path(c.input_shape)}
            entry.params = sum(p.numel() for p in layer.parameters())
            entry.macs = layer.macs(c.input_shape)
            entry.relative_error = 0.1
        else:
            entry.reason = "not chosen"
        entries.append(entry)
    plan = CompressionPlan(
        model_type=type(model).__name__,
        method="gkpd",
        target_ratio=1.1,
        strategy="uniform",
        objective="error",
        dense_params=dense.total_params,
        params=sum(p.numel() for p in model.parameters()),
        dense_macs=dense.total_macs,
        macs=sum(e.macs for e in entries),
        layers=entries,
    )
    return model, plan


def saved(tmp_path, card=ARCH):
    model, plan = compress_by_hand(dense_model())
    with torch.no_grad():  # weights that differ from the decomposition: load must not redo it
        model.layer1[0].conv1.a.mul_(1.5)
    directory = io.save(tmp_path / "saved", model, plan, card=card)
    return directory, model, plan


LOAD_SCRIPT = textwrap.dedent(
    """
    import pickle, sys, torch
    import gkpd.io, gkpd.models
    from safetensors.torch import load_file, save_file
    def no_pickle(*args, **kwargs):
        raise AssertionError("something was unpickled")
    pickle.load = pickle.loads = torch.load = no_pickle
    model = gkpd.models.create("resnet20", num_classes=10, in_channels=1)
    gkpd.io.load(sys.argv[1], model)
    x = load_file(sys.argv[2])["x"]
    with torch.no_grad():
        save_file({"y": model(x)}, sys.argv[3])
    """
)


@pytest.mark.parametrize("planner", [False, True])
def test_round_trip_in_a_fresh_process_is_bit_identical(tmp_path, planner):
    if planner:  # the real planner and apply_, fine-tuning imitated by a perturbation
        from gkpd.apply import compress

        model, plan = compress(dense_model(), example(), ratio=3.0, strategy="global")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        directory = io.save(tmp_path / "saved", model, plan, card=ARCH)
    else:
        directory, model, _ = saved(tmp_path)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            str(script),
            str(directory),
            str(tmp_path / "x.safetensors"),
            str(tmp_path / "y.safetensors"),
        ],
        check=True,
        env=env,
        timeout=120,
    )
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["y"], expected)


def test_load_in_process_rebuilds_layers_and_card(tmp_path):
    directory, model, plan = saved(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == [
        "manifest.json",
        "model.json",
        "model.safetensors",
        "plan.json",
    ]
    assert io.read_card(directory)["architecture"] == "resnet20"
    assert CompressionPlan.load(directory / "plan.json") == plan
    loaded = io.load(directory, dense_model(seed=5))
    assert not loaded.training
    assert isinstance(loaded.layer1[0].conv1, KroneckerConv2d)
    assert isinstance(loaded.fc, KroneckerLinear) and loaded.fc.rank == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert io.is_saved_model(directory) and not io.is_saved_model(tmp_path)


def test_save_without_card_and_overwrite_keeps_other_files(tmp_path):
    directory, model, plan = saved(tmp_path)
    (directory / "checkpoint.pt").write_bytes(b"training state")
    io.save(directory, model, plan)  # overwrite, no card: the stale card goes
    assert not (directory / "model.json").exists()
    assert io.read_card(directory) is None
    assert (directory / "checkpoint.pt").read_bytes() == b"training state"
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    io.load(directory, dense_model())


def test_save_refuses_a_model_the_plan_was_not_applied_to(tmp_path):
    _, plan = compress_by_hand(dense_model())
    with pytest.raises(ValueError, match="apply the plan"):
        io.save(tmp_path / "x", dense_model(), plan)
    with pytest.raises(ValueError, match="architecture"):
        io.save(tmp_path / "x", dense_model(), plan, card={"model_kwargs": {}})
    with pytest.raises(TypeError, match="CompressionPlan"):
        io.save(tmp_path / "x", dense_model(), plan.to_dict())
    (tmp_path / "file").write_text("")
    model, plan = compress_by_hand(dense_model())
    with pytest.raises(ValueError, match="not a directory"):
        io.save(tmp_path / "file", model, plan)


def test_a_save_interrupted_while_writing_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    directory, model, plan = saved(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = io.load(directory, dense_model()).eval()(x)
        model.layer1[0].conv1.a.mul_(2.0)  # the save that fails would hold other weights

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # half a file, then the interruption
            handle.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save(directory, model, plan)  # no card: the earlier card must stay too
    monkeypatch.undo()
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no temp files
    assert (directory / "model.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(io.load(directory, dense_model()).eval()(x), expected)


def test_a_save_interrupted_while_renaming_is_refused_by_load(tmp_path, monkeypatch):
    directory, model, plan = saved(tmp_path)
    renames = []

    def replace_once(source, target):
        if renames:
            raise KeyboardInterrupt
        renames.append(target)
        os.rename(source, target)

    monkeypatch.setattr("gkpd.io.os.replace", replace_once)
    with pytest.raises(KeyboardInterrupt):
        io.save(directory, model, plan, card=ARCH)
    monkeypatch.undo()
    assert renames and not [p for p in directory.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="not a complete gkpd save"):
        io.load(directory, dense_model())


@pytest.mark.parametrize("name", ["plan.json", "model.safetensors", "manifest.json"])
def test_truncated_files(tmp_path, name):
    directory, _, _ = saved(tmp_path)
    path = directory / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        io.load(directory, dense_model())


@pytest.mark.parametrize("name", ["plan.json", "model.safetensors"])
def test_corrupt_bytes_are_detected(tmp_path, name):
    directory, _, _ = saved(tmp_path)
    path = directory / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} is corrupt"):
        io.load(directory, dense_model())


def _rewrite_manifest(directory):
    """Make the manifest agree with the files again, to reach the checks behind it."""
    manifest = json.loads((directory / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {
            "bytes": (directory / name).stat().st_size,
            "sha256": file_sha256(directory / name),
        }
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_invalid_files_behind_a_consistent_manifest(tmp_path):
    directory, _, _ = saved(tmp_path)
    (directory / "plan.json").write_text('{"version": 1, "layers": [')
    _rewrite_manifest(directory)
    with pytest.raises(ValueError, match=r"plan\.json is truncated or not JSON"):
        io.load(directory, dense_model())

    directory, _, _ = saved(tmp_path / "b")
    (directory / "model.safetensors").write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}')
    _rewrite_manifest(directory)
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt"):
        io.load(directory, dense_model())

    directory, _, _ = saved(tmp_path / "c")
    state = load_file(str(directory / "model.safetensors"))
    state.pop("fc.bias")
    save_file(state, str(directory / "model.safetensors"))
    _rewrite_manifest(directory)
    with pytest.raises(ValueError, match=r"model\.safetensors .*missing \['fc\.bias'\]"):
        io.load(directory, dense_model())


def test_plan_for_another_architecture(tmp_path):
    directory, _, _ = saved(tmp_path)
    other = models.create("resnet20", num_classes=10, in_channels=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"plan\.json was made for another architecture"):
        io.load(directory, other)
    # nothing in the model was changed
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match=r"plan\.json was made for another architecture"):
        io.load(directory, models.create("resnet32", num_classes=10, in_channels=1))
    with pytest.raises(ValueError, match="another architecture"):
        io.load(directory, dense_model(num_classes=5))


def test_missing_directory_and_foreign_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.load(tmp_path / "nope", dense_model())
    with pytest.raises(ValueError, match="manifest.json is missing"):
        io.load(tmp_path, dense_model())


def test_a_file_of_a_save_is_refused_naming_the_save(tmp_path):
    directory, _, _ = saved(tmp_path)
    with pytest.raises(NotADirectoryError,
                       match=rf"plan.json is a file, not a directory; .*\({directory}\)"):
        io.load(directory / "plan.json", dense_model())


def test_loading_into_a_model_of_another_dtype_warns(tmp_path):
    directory, model, _ = saved(tmp_path)
    with pytest.warns(UserWarning, match=r"loaded torch.float32 as torch.float64"):
        loaded = io.load(directory, dense_model().double())
    assert loaded.fc.a.dtype == torch.float64  # load_state_dict's cast, now said
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(loaded.state_dict()[key].float(), value), key


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    directory, _, _ = saved(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    io.load(directory, dense_model())
