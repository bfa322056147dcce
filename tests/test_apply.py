"""Compressing attention models: every method's layers run inside torch's transformer modules
in train and eval mode, the attention projections are planned and compressed, and at full
rank the compressed model computes what the dense one does (the oracle). Parents that read a
replaced layer's ``weight`` (T5): they run, or compress says which layer fails."""

import copy
import math

import pytest
import torch
from torch import nn

import gkpd
from gkpd.counting import count_model
from gkpd.decompose import full_rank
from gkpd.layers.attention import UnfusedTransformerEncoderLayer, UnpackedMultiheadAttention
from gkpd.methods import get_method
from gkpd.methods._tensorized import default_modes, tensor_modes

pytestmark = pytest.mark.usefixtures("one_thread")

E = 32


class Encoder(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, 2, 64, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(E, 4)

    def forward(self, x, padding=None):
        return self.head(self.encoder(x, src_key_padding_mask=padding))


class ViT(nn.Module):
    """A ViT-style block on nn.MultiheadAttention called directly, as torchvision's does."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, E, 4, stride=4)
        self.norm = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(E, 64), nn.GELU(), nn.Linear(64, E))
        self.head = nn.Linear(E, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        y = self.norm(x)
        x = x + self.attn(y, y, y)[0]
        return self.head((x + self.mlp(x)).mean(1))


def _full_rank(plan, model):
    """Every compressed layer of ``plan`` at its full rank (an exact decomposition)."""
    modules = dict(gkpd.layers.attention.with_unpacked_layers(model).named_modules())
    for entry in plan.compressed_layers:
        if entry.method == "gkpd":
            entry.settings["rank"] = full_rank(entry.settings["a_shape"], entry.settings["b_shape"])
        elif entry.method == "svd":
            entry.settings["rank"] = min(entry.weight_shape)
        else:
            shape = entry.weight_shape
            entry.settings["rank"] = get_method(entry.method).max_rank(
                tensor_modes(shape, *default_modes(shape))
            )
    assert all(name in modules for name in (e.name for e in plan.layers))
    return plan


def _linear_of(layer):
    """A tensor-ring layer as the nn.Linear of its reconstructed weight (the reference where
    its decomposition is not exact)."""
    linear = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        linear.weight.copy_(layer.reconstruct_weight())
        linear.bias.copy_(layer.bias)
    return linear


def _padding():
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, -2:] = True
    return padding


@pytest.mark.parametrize("method", ["gkpd", "svd", "tensor_train", "tensor_ring"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_compressed_encoder_at_full_rank_is_the_dense_one(method, batch_first):
    torch.manual_seed(0)
    dense = Encoder(batch_first).eval()
    x = torch.randn(2, 6, E) if batch_first else torch.randn(6, 2, E)
    plan = gkpd.plan(dense, x, ratio=1.5, method=method, tolerance=0.5)
    names = [e.name for e in plan.compressed_layers]
    assert "encoder.layers.0.self_attn.q_proj" in names  # attention is planned, not skipped
    assert "encoder.layers.1.self_attn.out_proj" in names
    compressed = gkpd.apply_(copy.deepcopy(dense), _full_rank(plan, dense))
    layer = compressed.encoder.layers[0]
    assert isinstance(layer, UnfusedTransformerEncoderLayer)
    assert isinstance(layer.self_attn, UnpackedMultiheadAttention)
    assert not isinstance(layer.linear1, nn.Linear)
    if method == "tensor_ring":  # not exact at its largest rank: compare with its weights
        dense = copy.deepcopy(compressed)
        for name, module in list(dense.named_modules()):
            if hasattr(module, "cores"):
                dense.set_submodule(name, _linear_of(module))
    padding = _padding() if batch_first else None
    for training in (True, False):
        dense.train(training), compressed.train(training)
        with torch.no_grad():  # eval: the dense model takes torch's fused and nested paths
            expected, got = dense(x, padding), compressed(x, padding)
        keep = ~padding if padding is not None else slice(None)
        torch.testing.assert_close(got[keep], expected[keep], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sequential", [False, True])
def test_an_encoder_compresses_with_calibration(sequential):
    # the calibration runs the model with its attention unpacked: the transformer layers
    # must run through it then, not only once every layer is replaced
    torch.manual_seed(0)
    dense = Encoder().eval()
    x, data = torch.randn(2, 6, E), torch.randn(16, 6, E)
    compressed, plan = gkpd.compress(
        dense, x, ratio=1.3, calibration=gkpd.Calibration(data, sequential=sequential)
    )
    assert any(".self_attn.q_proj" in e.name for e in plan.compressed_layers)
    assert isinstance(compressed.encoder.layers[0].self_attn, UnpackedMultiheadAttention)
    with torch.no_grad():
        out = compressed(x)
    assert out.shape == (2, 6, 4) and torch.isfinite(out).all()


def test_compressed_transformer_trains_and_evaluates_at_2x():
    torch.manual_seed(0)
    dense = nn.Transformer(E, 2, 1, 1, 64, dropout=0.1, batch_first=True)
    src, tgt = torch.randn(2, 6, E), torch.randn(2, 5, E)
    compressed, plan = gkpd.compress(dense, (src, tgt), ratio=2)
    assert abs(plan.achieved_ratio / 2 - 1) <= 0.03
    assert any(".multihead_attn.k_proj" in e.name for e in plan.compressed_layers)
    optimizer = torch.optim.SGD(compressed.parameters(), lr=0.01)
    compressed.train()
    loss = compressed(src, tgt).square().mean()
    loss.backward()
    optimizer.step()
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        out = compressed.eval()(src, tgt, tgt_mask=causal)
    assert out.shape == (2, 5, E) and torch.isfinite(out).all()
    counted = count_model(compressed, (src, tgt))
    assert counted.total_macs == 2 * plan.macs and counted.total_params == plan.params


def test_vit_attention_is_compressed_and_counted():
    torch.manual_seed(0)
    dense = ViT().eval()
    x = torch.randn(1, 3, 16, 16)
    plan = gkpd.plan(dense, x, ratio=1.5, tolerance=0.5)
    assert plan.attention_macs == 2 * 16 * 16 * E  # QKᵀ and AV over 16 patches
    assert plan.dense_macs == count_model(dense, x).total_macs
    compressed = gkpd.apply_(copy.deepcopy(dense), plan)
    assert isinstance(compressed.attn, UnpackedMultiheadAttention)
    assert count_model(compressed, x).total_macs == plan.macs
    compressed = gkpd.apply_(copy.deepcopy(dense), _full_rank(plan, dense))
    for training in (True, False):
        dense.train(training), compressed.train(training)
        torch.testing.assert_close(compressed(x), dense(x), rtol=1e-3, atol=1e-4)


def test_save_and_load_a_compressed_encoder(tmp_path):
    torch.manual_seed(0)
    dense = Encoder().eval()
    x = torch.randn(2, 6, E)
    compressed, plan = gkpd.compress(dense, x, ratio=2)
    gkpd.save(tmp_path / "m", compressed, plan)
    torch.manual_seed(1)
    loaded = gkpd.load(tmp_path / "m", Encoder()).eval()
    assert isinstance(loaded.encoder.layers[1], UnfusedTransformerEncoderLayer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, _padding()), compressed.eval()(x, _padding()))


def test_a_plan_without_attention_entries_leaves_the_attention_packed():
    torch.manual_seed(0)
    dense = Encoder().eval()
    x = torch.randn(2, 6, E)
    plan = gkpd.plan(dense, x, ratio=1.3, tolerance=0.5, include="re:.*linear.")
    compressed = gkpd.apply_(copy.deepcopy(dense), plan)
    assert isinstance(compressed.encoder.layers[0].self_attn, UnpackedMultiheadAttention)
    plan.layers = [e for e in plan.layers if "self_attn" not in e.name]  # as older plans were
    compressed = gkpd.apply_(copy.deepcopy(dense), plan)
    layer = compressed.encoder.layers[0]
    assert isinstance(layer.self_attn, nn.MultiheadAttention)
    assert isinstance(layer, UnfusedTransformerEncoderLayer)  # its linears were replaced
    with torch.no_grad():
        out = compressed.eval()(x, _padding())
    assert torch.isfinite(out).all() and out.shape == (2, 6, 4)


def test_a_bad_plan_changes_nothing():
    torch.manual_seed(0)
    dense = Encoder().eval()
    plan = gkpd.plan(dense, torch.randn(2, 6, E), ratio=2)
    plan.layers[0].weight_shape = (3, 3)
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="does not fit"):
        gkpd.apply_(model, plan)
    assert isinstance(model.encoder.layers[0].self_attn, nn.MultiheadAttention)
    assert math.isclose(sum(p.numel() for p in model.parameters()), plan.dense_params)


class ReadsChildWeight(nn.Module):
    """A parent that reads its child's ``weight`` before calling it, as Hugging Face's T5
    feed-forward block reads ``wo.weight.dtype``; with a batch norm to see statistics kept."""

    def __init__(self):
        super().__init__()
        self.wi, self.norm, self.wo = nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Linear(64, 32)

    def forward(self, x):
        return self.wo(self.norm(torch.relu(self.wi(x))).to(self.wo.weight.dtype))


@pytest.mark.parametrize("method", ["gkpd", "svd", "tensor_train"])
def test_a_parent_that_reads_a_replaced_layers_weight_runs_compressed(method):
    torch.manual_seed(0)
    model, x = ReadsChildWeight().train(), torch.randn(8, 32)
    small, plan = gkpd.compress(model, x, ratio=2, method=method)
    assert plan.layer("wo").compressed and small.training
    # compress ran the compressed model once, in eval mode: statistics as the dense model's
    torch.testing.assert_close(small.norm.running_mean, model.norm.running_mean)
    small(x).sum().backward()
    assert all(p.grad is not None for p in small.wo.parameters())
    with torch.no_grad():
        assert small.eval()(x).shape == (8, 32)


class ReadsChildFeatures(ReadsChildWeight):
    def forward(self, x):
        return super().forward(x)[:, : self.wo.out_features]


def test_a_compressed_model_that_fails_where_the_dense_one_ran_is_a_clear_error():
    model, x = ReadsChildFeatures().eval(), torch.randn(8, 32)
    with pytest.raises(ValueError, match=r"the compressed model fails on example_input .*"
                       r"A module reads 'out_features' of 'wo', a layer that 'svd' replaced"):
        gkpd.compress(model, x, ratio=2, method="svd")


def test_hugging_face_t5_runs_compressed_in_eval_and_train_mode():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=1,
                                   num_heads=2, d_kv=16)
    model = transformers.T5Model(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    x = {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    small, plan = gkpd.compress(model, x, ratio=2)
    wo = [e.name for e in plan.compressed_layers if e.name.endswith("DenseReluDense.wo")]
    assert wo and all(isinstance(small.get_submodule(n), gkpd.KroneckerLinear) for n in wo)
    with torch.no_grad():
        want, got = model(**x), small(**x)
    assert type(got) is type(want) and got.last_hidden_state.shape == want.last_hidden_state.shape
    small.train()(**x).last_hidden_state.sum().backward()
    assert small.get_submodule(wo[0]).a.grad is not None


def test_set_submodule_is_a_deprecated_alias_of_torchs():
    model = nn.Sequential(nn.Linear(2, 2))
    replacement = nn.Linear(2, 3)
    with pytest.warns(DeprecationWarning, match="use model.set_submodule"):
        gkpd.apply.set_submodule(model, "0", replacement)
    assert model[0] is replacement


@pytest.mark.parametrize("method", ["gkpd", "svd", "tucker", "tensor_train", "gkpd-whitened"])
def test_frozen_layers_stay_frozen(method):
    """A layer the user froze (fine-tuning only a head, say) keeps its parameters frozen when
    compressed; the bias and the weight each as the dense layer had them."""
    if method == "tucker":
        pytest.importorskip("tensorly")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1))
    model[2].requires_grad_(False)
    model[4].bias.requires_grad_(False)
    x = torch.randn(4, 8, 6, 6)
    options = {"method": method}
    if method == "gkpd-whitened":
        options = {"method": "gkpd", "calibration": torch.randn(16, 8, 6, 6)}
    small, plan = gkpd.compress(model, x, ratio=1.6, min_params=0, tolerance=0.2, **options)
    assert {e.name for e in plan.compressed_layers} >= {"2", "4"}
    frozen = list(small[2].parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    trainable = {n: p.requires_grad for n, p in small[4].named_parameters()}
    assert trainable and all(t == (not n.endswith("bias")) for n, t in trainable.items())
    assert all(p.requires_grad for p in small[0].parameters())
