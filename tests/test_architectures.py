"""The architectures users bring (ResNet-18, MobileNetV3, EfficientNet, ConvNeXt, ViT,
nn.TransformerEncoder; written in ``testkit.architectures`` with torchvision's structure),
compressed 2× with default arguments by GKPD and by SVD: the ratio is met, the compressed
model answers in the dense model's shape with finite values in train and eval mode, gradients
reach every trainable parameter, what runs is what the plan counted, and a save +
``gkpd.load`` round trip gives the same outputs. Small randomly initialised Hugging Face models
(BERT, DistilBERT, GPT-2, Llama, T5, ViT, ConvNeXt; skipped without ``transformers``) compress
2× with defaults, answer with the same output type and shapes, and round trip."""

import pytest
import torch
from testkit.architectures import ARCHITECTURES

import gkpd
from gkpd.counting import count_model
from gkpd.inputs import output_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

# layers whose compression the test checks: those that only a correct reading of the
# architecture reaches (a 1×1 shortcut, SE convs, channels-last linears, MHA's projections)
MUST_COMPRESS = {
    "resnet18": ["layer2.0.conv1", "layer4.0.downsample.0", "layer4.1.conv2"],
    "mobilenet_v3": ["features.6.block.2.fc1", "features.6.block.3.0", "classifier.0"],
    "efficientnet": ["features.6.block.0.0", "features.6.block.2.fc2", "classifier.1"],
    "convnext": ["features.1.0.pwconv1", "features.3.0.pwconv2", "features.2.1"],
    "vit": ["layers.0.self_attention.q_proj", "layers.1.self_attention.out_proj",
            "layers.1.mlp.0"],
    "transformer_encoder": ["encoder.layers.0.self_attn.v_proj", "encoder.layers.1.linear1"],
}


def _build(name, seed=0):
    build, shape = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return build().eval(), torch.randn(shape)


def _outputs(model, x, training):
    """The model's output in ``training`` mode: under no_grad in eval (where torch's
    transformer fast path runs), with gradients in train."""
    model.train(training)
    with torch.set_grad_enabled(training):
        return model(x)


@pytest.mark.parametrize("method", ["gkpd", "svd", "auto"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architecture_compresses_2x_trains_and_round_trips(name, method, tmp_path):
    dense, x = _build(name)
    compressed, plan = gkpd.compress(dense, x, ratio=2, method=method)
    assert abs(plan.achieved_ratio / 2 - 1) <= 0.03
    assert sum(p.numel() for p in compressed.parameters()) == plan.params
    assert count_model(compressed.eval(), x).total_macs == len(x) * plan.macs  # per sample
    compressed_names = {e.name for e in plan.compressed_layers}
    assert set(MUST_COMPRESS[name]) <= compressed_names
    methods = {e.method for e in plan.compressed_layers}
    assert methods <= {"gkpd", "tucker", "svd"} if method == "auto" else methods == {method}

    for training in (True, False):
        expected = _outputs(dense, x, training)
        out = _outputs(compressed, x, training)
        assert out.shape == expected.shape and torch.isfinite(out).all()

    compressed.zero_grad()
    _outputs(compressed, x, True).square().mean().backward()
    missing = [n for n, p in compressed.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    assert all(torch.isfinite(p.grad).all() for p in compressed.parameters())

    gkpd.save(tmp_path / "model", compressed, plan)
    fresh, _ = _build(name, seed=1)  # other weights: only the save can make it agree
    loaded = gkpd.load(tmp_path / "model", fresh)
    torch.testing.assert_close(_outputs(loaded, x, False), _outputs(compressed, x, False))


def test_compressed_transformer_encoder_fast_path_agrees_with_the_slow_path():
    """In eval mode under no_grad torch takes nn.TransformerEncoder's fused path (nested
    tensors for the padded batch) where it can; with gradients on it cannot. The compressed
    encoder must answer the same on both, on the positions that are not padding."""
    dense, x = _build("transformer_encoder")
    assert dense.encoder.use_nested_tensor  # the dense model has the fast path to take
    compressed, _ = gkpd.compress(dense, x, ratio=2)
    padding = torch.zeros(x.shape[:2], dtype=torch.bool)
    padding[1, -2:] = True
    compressed.eval()
    with torch.no_grad():
        fast = compressed.encoder(compressed.embed(x), src_key_padding_mask=padding)
    slow = compressed.encoder(compressed.embed(x), src_key_padding_mask=padding)
    keep = ~padding
    torch.testing.assert_close(fast[keep], slow.detach()[keep], rtol=1e-4, atol=1e-5)


def _hugging_face(name):
    """A small randomly initialised Hugging Face model and its keyword inputs."""
    t = pytest.importorskip("transformers")
    text = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64}
    configs = {
        "bert": lambda: t.BertModel(t.BertConfig(**text)),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**text, num_key_value_heads=1)),
        "t5": lambda: t.T5Model(t.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2,
                                           num_heads=2, d_kv=16)),
        "vit": lambda: t.ViTModel(t.ViTConfig(**text | {"vocab_size": None}, image_size=16,
                                              patch_size=4)),
        "convnext": lambda: t.ConvNextModel(t.ConvNextConfig(
            hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32)),
    }
    torch.manual_seed(0)
    model = configs[name]().eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if name == "t5":
        inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    elif name in ("vit", "convnext"):
        inputs = {"pixel_values": torch.randn(2, 3, 32 if name == "convnext" else 16,
                                              32 if name == "convnext" else 16)}
    return model, inputs


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "llama", "t5", "vit",
                                  "convnext"])
def test_hugging_face_model_compresses_2x_answers_alike_and_round_trips(name, tmp_path):
    model, x = _hugging_face(name)
    small, plan = gkpd.compress(model, x, ratio=2)
    assert plan.achieved_ratio == pytest.approx(2, rel=0.03)
    with torch.no_grad():
        want, got = model(**x), small(**x)
    assert type(got) is type(want)
    assert [t.shape for t in output_tensors(got)] == [t.shape for t in output_tensors(want)]
    gkpd.save(tmp_path / "small", small, plan)
    loaded = gkpd.load(tmp_path / "small", _hugging_face(name)[0])
    with torch.no_grad():
        for a, b in zip(output_tensors(loaded(**x)), output_tensors(got), strict=True):
            torch.testing.assert_close(a, b)
