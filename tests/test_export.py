"""gkpd.export: merge back to dense, ONNX export checked in onnxruntime, torch.export and
torch.compile of compressed models, and ``gkpd export``."""

import json
import sys

import numpy as np
import pytest
import torch
from testkit.keyword_models import KeywordModel, token_batch
from torch import nn

import gkpd
from gkpd.cli import main
from gkpd.export import OnnxVerificationError, default_opset, export_program, merge, to_onnx
from gkpd.layers import KroneckerConv1d, KroneckerConv2d, KroneckerConv3d, KroneckerLinear

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


def small_dense(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 12),
    ).to(dtype)


def small_compressed(dtype=torch.float32) -> nn.Module:
    """small_dense with its convs and linear replaced by (low-rank) Kronecker layers."""
    dense = small_dense(dtype)
    dense[0] = KroneckerConv2d.from_dense(dense[0], a_shape=(2, 2, 1, 3), rank=2)
    dense[3] = KroneckerConv2d.from_dense(dense[3], a_shape=(2, 2, 3, 1), rank=2)
    dense[5] = KroneckerLinear.from_dense(dense[5], a_shape=(3, 8), rank=3)
    return dense.eval()


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# ----------------------------------------------------------------------------- merge


def test_merge_matches_compressed_and_has_dense_param_count():
    model = small_compressed(torch.float64)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    merged = merge(model)
    assert merged is not model and isinstance(model[0], KroneckerConv2d)  # copy by default
    assert [type(m) for m in merged] == [type(m) for m in small_dense()]
    assert merged[0].weight.dtype == torch.float64 and not merged.training
    n_dense = sum(p.numel() for p in small_dense().parameters())
    assert sum(p.numel() for p in merged.parameters()) == n_dense
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)


def test_merge_inplace_shared_nested_root_and_training_mode():
    conv1d = KroneckerConv1d(4, 6, 3, padding=1, a_shape=(2, 2, 1), rank=2).double()
    conv3d = KroneckerConv3d(2, 4, 3, a_shape=(2, 1, 1, 3, 1), rank=1).double().eval()
    shared = KroneckerLinear(6, 4, a_shape=(2, 3), rank=1).double()
    model = nn.ModuleDict({"c1": conv1d, "blocks": nn.ModuleList([shared, nn.Sequential(shared)]),
                           "c3": conv3d})
    same = merge(model, inplace=True)
    assert same is model
    assert isinstance(model["c1"], nn.Conv1d) and model["c1"].training
    assert isinstance(model["c3"], nn.Conv3d) and not model["c3"].training
    shared_dense = model["blocks"][0]
    assert isinstance(shared_dense, nn.Linear) and model["blocks"][1][0] is shared_dense
    torch.testing.assert_close(shared_dense.weight, shared.reconstruct_weight())
    root = merge(conv1d)  # the root itself
    assert isinstance(root, nn.Conv1d)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    torch.testing.assert_close(root(x), conv1d(x), rtol=1e-12, atol=1e-12)


class _Factored(nn.Module):
    """A stand-in for another factorized layer that offers ``to_dense()``."""

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.randn(5, 2, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(2, 3, dtype=torch.float64))

    def forward(self, x):
        return x @ self.v.t() @ self.u.t()

    def to_dense(self):
        linear = nn.Linear(3, 5, bias=False)  # float32 on purpose: merge restores the dtype
        with torch.no_grad():
            linear.weight.copy_(self.u @ self.v)
        return linear


def test_merge_uses_any_to_dense_and_keeps_plain_baselines():
    model = nn.Sequential(_Factored(), nn.Sequential(nn.Linear(5, 2), nn.Linear(2, 4)))
    merged = merge(model)
    assert isinstance(merged[0], nn.Linear) and merged[0].weight.dtype == torch.float64
    assert merged[1][0].weight.data_ptr() != model[1][0].weight.data_ptr()  # deep copy
    x = torch.randn(4, 3, dtype=torch.float64)
    # the stand-in rounded its weight through float32
    torch.testing.assert_close(merged[0](x), model[0](x), rtol=1e-6, atol=1e-6)


def test_merge_compressed_resnet_float64():
    dense = gkpd.models.create("resnet20", num_classes=10, in_channels=1).double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    compressed, plan = gkpd.compress(dense, x, ratio=3)
    merged = merge(compressed)
    assert not any(hasattr(m, "to_dense") for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == plan.dense_params
    torch.testing.assert_close(merged(x), compressed(x), rtol=1e-10, atol=1e-10)


def test_merge_gives_a_compressed_encoder_torchs_modules_back():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    dense = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(3, 5, 16)
    compressed, plan = gkpd.compress(dense, x, ratio=1.5, min_params=0)
    assert any(".self_attn.q_proj" in e.name for e in plan.compressed_layers)
    merged = merge(compressed)
    assert [type(m) for m in merged.modules()] == [type(m) for m in dense.modules()]
    assert merged.use_nested_tensor == dense.use_nested_tensor
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad():  # torch's fused kernels and nested path run the merged model
        got, expected = merged(x, src_key_padding_mask=padding), compressed(
            x, src_key_padding_mask=padding)
    torch.testing.assert_close(got[~padding], expected[~padding], rtol=1e-4, atol=1e-5)
    torch.jit.script(merged)  # torch's modules script


def test_merge_rejects_non_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        merge("resnet32")


# ----------------------------------------------------------------------------- onnx


def test_to_onnx_dynamic_batch_through_onnxruntime(tmp_path):
    model = small_compressed()
    path = to_onnx(model, torch.randn(1, 4, 6, 6), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == default_opset()
    assert not any(n.metadata_props for n in proto.graph.node)  # no stack traces, local paths
    for batch in (1, 5):
        x = torch.randn(batch, 4, 6, 6)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(ort_run(path, x), expected, rtol=1e-4, atol=1e-5)
    assert not model.training


def test_to_onnx_static_batch_opset_and_training_mode_restored(tmp_path):
    model = small_compressed().train()
    model[0].eval()  # mixed modes (a frozen part): each module comes back in its own
    path = to_onnx(model, torch.randn(2, 4, 6, 6), tmp_path / "s.onnx", opset=18,
                   dynamic_batch=False)
    assert model.training and model[3].training  # exported in eval mode, then restored
    assert not model[0].training
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == 18
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


def test_to_onnx_weight_path_stores_the_factors_not_the_dense_weight(tmp_path):
    torch.manual_seed(0)
    conv = KroneckerConv2d.from_dense(nn.Conv2d(16, 32, 3, padding=1), a_shape=(4, 4, 1, 3),
                                      rank=3)
    linear = KroneckerLinear.from_dense(nn.Linear(32, 64), a_shape=(8, 4), rank=2)
    conv.path = linear.path = "weight"  # the dense op with Σ a⊗b, as latency plans pick
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()
    path = to_onnx(model, torch.randn(1, 16, 8, 8), tmp_path / "w.onnx")
    proto = onnx.load(str(path))
    shapes = [tuple(t.dims) for t in proto.graph.initializer]
    assert (32, 16, 3, 3) not in shapes and (64, 32) not in shapes
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer if t.data_type == 1)
    assert stored == sum(p.numel() for p in model.parameters())


class _DiffersWhenExported(nn.Module):
    def forward(self, x):
        return x + 1 if torch.compiler.is_exporting() else x


def test_to_onnx_verification_failure_leaves_no_file(tmp_path):
    target = tmp_path / "bad.onnx"
    target.write_bytes(b"older file")
    with pytest.raises(OnnxVerificationError, match=r"max \|difference\| 1"):
        to_onnx(_DiffersWhenExported(), torch.randn(2, 3), target)
    assert target.read_bytes() == b"older file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]  # no temp file left


def test_an_onnxruntime_failure_is_a_verification_error_with_a_hint():
    from types import SimpleNamespace

    from gkpd.export import _compare
    from gkpd.inputs import ModelCall

    class FailingSession:  # what onnxruntime does with an operator it cannot run
        def get_inputs(self):
            return [SimpleNamespace(name="input")]

        def run(self, outputs, feeds):
            raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Attention node failed")

    with pytest.raises(OnnxVerificationError,
                       match=r"could not run .*Attention node failed.*opset=18"):
        _compare(FailingSession(), nn.Identity(), ModelCall.of(torch.randn(2, 3)), 1e-4, 1e-3,
                 "example input")


def test_to_onnx_argument_errors(tmp_path):
    model, x = small_compressed(), torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="path .* is a directory"):
        to_onnx(model, x, tmp_path)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        to_onnx(lambda t: t, x, tmp_path / "a.onnx")
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        to_onnx(model, "x", tmp_path / "a.onnx")
    with pytest.raises(TypeError, match=r"example_input\[1\] must be a tensor"):
        to_onnx(model, (x, 3), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match=r"the model failed on example_input"):
        to_onnx(model, (x, torch.zeros(2, 1)), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match="opset must be an int"):
        to_onnx(model, x, tmp_path / "a.onnx", opset=5)
    with pytest.raises(ValueError, match="atol must be"):
        to_onnx(model, x, tmp_path / "a.onnx", atol=-1)
    assert list(tmp_path.iterdir()) == []


def _keyword_compressed():
    torch.manual_seed(0)
    small, _ = gkpd.compress(KeywordModel().eval(), token_batch(), ratio=2)
    return small.eval()


def test_to_onnx_with_keyword_inputs_and_a_dict_output(tmp_path):
    model = _keyword_compressed()
    # batch 1: traced as a batch of 2 so that the batch stays dynamic
    path = to_onnx(model, token_batch(batch=1), tmp_path / "k.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = token_batch(batch=4, seed=1)
    got = session.run(None, {k: v.numpy() for k, v in x.items()})
    with torch.no_grad():
        expected = model(**x)
    assert len(got) == len(expected) == 2
    for g, e in zip(got, expected.values(), strict=True):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5)


def test_to_onnx_keyword_input_errors(tmp_path):
    model, x = _keyword_compressed(), token_batch()
    with pytest.raises(TypeError, match=r"does not fit KeywordModel.forward.*'mask'"):
        to_onnx(model, {"input_ids": x["input_ids"], "mask": x["attention_mask"]},
                tmp_path / "a.onnx")
    with pytest.raises(TypeError, match=r"example_input\['attention_mask'\] must be a tensor or "
                                        r"a constant"):
        to_onnx(model, {**x, "attention_mask": [1, 0]}, tmp_path / "a.onnx")
    assert list(tmp_path.iterdir()) == []


class _MaskedAttention(nn.Module):
    """Takes an (L, L) additive mask: an input without a batch dim."""

    def __init__(self):
        super().__init__()
        self.q, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, mask):
        scores = self.q(x) @ x.transpose(1, 2) + mask
        return self.out(scores.softmax(-1) @ x)


@pytest.mark.parametrize("batch", [1, 3])
def test_an_input_without_a_batch_dim_keeps_its_shape(tmp_path, batch):
    torch.manual_seed(0)
    length = 5
    mask = torch.triu(torch.full((length, length), -1e9), 1)
    model, _ = gkpd.compress(_MaskedAttention().eval(),
                             {"x": torch.randn(3, length, 16), "mask": mask}, ratio=1.5,
                             min_params=0)
    with pytest.warns(UserWarning, match="exported with their fixed shapes"):
        path = to_onnx(model, {"x": torch.randn(batch, length, 16), "mask": mask},
                       tmp_path / "m.onnx")  # verified at the batch given and at batch + 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, length, 16)
    (got,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x, mask).numpy(), rtol=1e-4, atol=1e-5)
    program = export_program(model, {"x": torch.randn(batch, length, 16), "mask": mask})
    torch.testing.assert_close(program.module()(x=x, mask=mask), model(x, mask))


def test_a_model_torch_export_cannot_trace_is_a_short_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(ValueError, match=r"torch.export.export failed on Branchy \(") as info:
        export_program(Branchy(), torch.randn(2, 3))
    assert len(str(info.value)) < 1000


def test_a_compressed_gpt2_exports_without_its_cache_and_says_so_with_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(1, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    x = {"input_ids": ids, "use_cache": False}
    small, _ = gkpd.compress(transformers.GPT2LMHeadModel(config).eval(), x, ratio=1.5,
                             min_params=0)
    path = to_onnx(small, x, tmp_path / "gpt2.onnx")  # checked in onnxruntime
    assert [i.name for i in onnx.load(str(path)).graph.input] == ["input_ids"]
    with pytest.raises(ValueError, match=r"returns a Hugging Face key/value cache "
                                         r"\(past_key_values\).*add use_cache=False"):
        to_onnx(small, {"input_ids": ids}, tmp_path / "cached.onnx")
    assert not (tmp_path / "cached.onnx").exists()


def test_gkpd_export_comes_with_import_gkpd_and_onnx_does_not():
    import subprocess
    import sys

    code = ("import sys, gkpd; assert callable(gkpd.export.merge); "
            "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_to_onnx_without_onnxruntime_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'gkpd\[export\]'"):
        to_onnx(small_compressed(), torch.randn(1, 4, 6, 6), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- torch.export


def test_torch_export_dynamic_batch_matches_eager():
    model = small_compressed()
    program = export_program(model, torch.randn(1, 4, 6, 6))
    plain = torch.export.export(model, (torch.randn(3, 4, 6, 6),))  # the bare call works too
    for batch in (1, 4):
        x = torch.randn(batch, 4, 6, 6)
        with torch.no_grad():
            expected = model(x)
        torch.testing.assert_close(program.module()(x), expected)
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(plain.module()(x), model(x))


def test_torch_export_with_keyword_inputs_keeps_the_batch_dynamic():
    model = _keyword_compressed()
    program = export_program(model, token_batch(batch=2))
    x = token_batch(batch=5, seed=2)
    with torch.no_grad():
        expected = model(**x)
    got = program.module()(**x)
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_torch_compile_matches_eager():
    # backend "inductor" works too but compiles for ~20 s on one core; aot_eager traces the
    # same graph through dynamo and AOTAutograd
    model = small_compressed()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        for batch in (2, 5):
            x = torch.randn(batch, 4, 6, 6)
            torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("channel_path", ["b_first_channels", "a_first_channels"])
def test_channel_paths_export_to_onnx_torch_export_and_compile(tmp_path, channel_path):
    # b_first_channels with C1 = 1 ends in a channel shuffle; a_first_channels needs C2 = 1.
    # Error plans run these on the path "auto"; latency plans pin them.
    torch.manual_seed(0)
    a_shape = (2, 1, 3, 1) if channel_path == "b_first_channels" else (8, 16, 3, 1)
    conv = KroneckerConv2d.from_dense(nn.Conv2d(16, 16, 3, padding=1), a_shape=a_shape, rank=2)
    conv.path = channel_path
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = to_onnx(model, torch.randn(1, 16, 6, 6), tmp_path / "c.onnx")
    program = export_program(model, torch.randn(1, 16, 6, 6))
    compiled = torch.compile(model, backend="aot_eager")
    for batch in (1, 3):
        x = torch.randn(batch, 16, 6, 6)
        with torch.no_grad():
            expected = model(x)
            torch.testing.assert_close(expected, model[0].to_dense()(x).relu().mean((2, 3)))
            torch.testing.assert_close(program.module()(x), expected)
            torch.testing.assert_close(compiled(x), expected)
        np.testing.assert_allclose(ort_run(path, x), expected.numpy(), rtol=1e-4, atol=1e-5)
    # the large factor is stored as it is, never the dense weight (16·16·9 = 2304 floats);
    # the exporter's constant folding may store the small factor's expansion into the
    # grouped stage's weight instead of the factor (here 96 floats for 12)
    initializers = onnx.load(str(path)).graph.initializer
    assert (16, 16, 3, 3) not in {tuple(t.dims) for t in initializers}
    stored = sum(int(np.prod(t.dims)) for t in initializers if t.data_type == 1)
    params = sum(p.numel() for p in model.parameters())
    assert params <= stored <= 1.15 * params
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the check


@pytest.fixture(scope="module")
def resnet32_onnx(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("resnet32")
    dense = gkpd.models.load_pretrained("resnet32_fashion_mnist").eval()
    x = torch.randn(1, 1, 28, 28)
    compressed, plan = gkpd.compress(dense, x, ratio=5)
    dense_path = to_onnx(dense, x, root / "dense.onnx")
    compressed_path = to_onnx(compressed, x, root / "compressed.onnx", atol=1e-4, rtol=0)
    return compressed, plan, dense_path, compressed_path


def test_resnet32_onnx_matches_torch_and_is_smaller_by_the_plan_ratio(resnet32_onnx):
    compressed, plan, dense_path, compressed_path = resnet32_onnx
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            expected = compressed(x).numpy()
        assert np.abs(ort_run(compressed_path, x) - expected).max() <= 1e-4
    ratio = dense_path.stat().st_size / compressed_path.stat().st_size
    assert ratio == pytest.approx(plan.achieved_ratio, rel=0.05)
    # the factors are stored, not a reconstructed dense weight of a compressed layer
    proto = onnx.load(str(compressed_path))
    shapes = {tuple(t.dims) for t in proto.graph.initializer}
    modules = dict(compressed.named_modules())
    for entry in plan.compressed_layers:
        assert tuple(modules[entry.name].weight_shape) not in shapes, entry.name


# ----------------------------------------------------------------------------- cli


def test_cli_export_onnx_and_merge(tmp_path, capsys):
    saved = tmp_path / "compressed"
    assert main(["compress", "resnet32_fashion_mnist", "--ratio", "5", "--out", str(saved)]) == 0
    capsys.readouterr()
    out, merged_dir = tmp_path / "m.onnx", tmp_path / "dense"
    code = main(["export", str(saved), "--onnx", str(out), "--batch", "2", "--merge-out",
                 str(merged_dir), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["onnx"] == str(out) and result["onnx_bytes"] == out.stat().st_size
    assert result["verified"] and result["input_shape"] == [2, 1, 28, 28]
    from gkpd.resolve import resolve_model

    compressed, _ = resolve_model(str(saved))
    merged, card = resolve_model(str(merged_dir))
    assert result["merged_params"] == sum(p.numel() for p in merged.parameters())
    assert card["architecture"] == "resnet32" and card["merged_from"] == str(saved.resolve())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = compressed(x)
        torch.testing.assert_close(merged(x), expected, rtol=1e-4, atol=1e-4)
    assert np.abs(ort_run(out, x) - expected.numpy()).max() <= 1e-4
    # existing outputs are refused without --force; nothing to do is an error
    assert main(["export", str(saved), "--onnx", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(saved)]) == 2
    assert "nothing to do" in capsys.readouterr().err
