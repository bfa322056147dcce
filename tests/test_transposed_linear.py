"""transformers' ``Conv1D`` (GPT-2's attention and MLP layers, weight stored ``(in, out)``) is
planned, compressed, counted, saved and merged as the ``nn.Linear`` it equals. Oracles: the
Conv1D's own output, the linear MAC formula, and the compressed model before saving."""

import pytest
import torch
from torch import nn

import gkpd
from gkpd.counting import count_model
from gkpd.export import merge
from gkpd.inputs import output_tensors
from gkpd.plan import UnreachableRatio
from gkpd.transposed_linear import as_linear, is_transposed_linear

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _tokens():
    return {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}


def test_as_linear_computes_what_the_conv1d_does():
    conv = transformers.pytorch_utils.Conv1D(24, 10)  # nf=24 outputs, nx=10 inputs
    nn.init.normal_(conv.bias)
    conv.weight.requires_grad_(False)
    linear = as_linear(conv.train(False))
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(linear(x), conv(x))
    assert (linear.in_features, linear.out_features) == (10, 24)
    assert not linear.weight.requires_grad and linear.bias.requires_grad and not linear.training
    assert is_transposed_linear(conv) and not is_transposed_linear(linear)
    with pytest.raises(TypeError, match="module must be transformers' Conv1D, got Linear"):
        as_linear(linear)


def test_dense_gpt2_counts_its_conv1d_layers_as_linear_products():
    model, x = _gpt2(), _tokens()
    counts = {c.name: c.macs for c in count_model(model, x).layers}
    tokens = x["input_ids"].numel()
    for block in range(2):
        for name in CONV1D:
            conv = model.get_submodule(f"transformer.h.{block}.{name}")
            assert counts[f"transformer.h.{block}.{name}"] == tokens * conv.weight.numel()


def test_gpt2_compresses_its_conv1d_layers_saves_loads_and_merges(tmp_path):
    model, x = _gpt2(), _tokens()
    small, plan = gkpd.compress(model, x, ratio=2)
    names = {f"transformer.h.{b}.{n}" for b in range(2) for n in CONV1D}
    compressed = {e.name: e for e in plan.compressed_layers}
    assert names <= compressed.keys()
    assert all(compressed[n].module_type == "Linear" for n in names)
    assert all(isinstance(small.get_submodule(n), gkpd.KroneckerLinear) for n in names)
    with torch.no_grad():
        want, got = model(**x), small(**x)
    assert type(got) is type(want) and got.logits.shape == want.logits.shape
    gkpd.save(tmp_path / "small", small, plan)
    loaded = gkpd.load(tmp_path / "small", _gpt2())
    merged = merge(small)
    assert all(type(merged.get_submodule(n)) is transformers.pytorch_utils.Conv1D
               for n in names)
    original = _gpt2()  # the architecture from_pretrained would build: same keys and shapes
    original.load_state_dict(merged.state_dict())
    with torch.no_grad():
        for other in (loaded(**x), merged(**x), original(**x)):
            for a, b in zip(output_tensors(other), output_tensors(got), strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_conv1d_left_dense_or_pruned_merges_back_to_a_conv1d():
    model, x = _gpt2(), _tokens()
    small, plan = gkpd.compress(model, x, ratio=1.2, method="svd",
                                exclude=["re:.*mlp.*"], tolerance=0.1)
    merged = merge(small)
    conv1d = transformers.pytorch_utils.Conv1D
    assert type(merged.get_submodule("transformer.h.0.mlp.c_fc")) is conv1d  # left dense
    assert type(merged.get_submodule("transformer.h.0.attn.c_proj")) is not conv1d  # svd stages
    linear = as_linear(model.get_submodule("transformer.h.0.mlp.c_fc"))
    back = merge(linear)
    assert type(back) is conv1d
    with torch.no_grad():
        h = torch.randn(2, 3, 32)
        torch.testing.assert_close(back(h), model.get_submodule("transformer.h.0.mlp.c_fc")(h))


def test_patterns_name_conv1d_layers_by_either_type():
    model, tokens = _gpt2(), _tokens()
    conv1d = transformers.pytorch_utils.Conv1D
    for pattern in ("Conv1D", conv1d):
        plan = gkpd.plan(model, tokens, ratio=1.2, include=pattern, min_params=0)
        names = {e.name for e in plan.compressed_layers}
        assert names and all(".attn." in n or ".mlp." in n for n in names)
        # all 8 Conv1D layers excluded: what is left (tied embeddings) cannot reach 1.05
        with pytest.raises(UnreachableRatio,
                           match=r"in 8 layers \('transformer.h.0.attn.c_attn'.* excluded"):
            gkpd.plan(model, tokens, ratio=1.05, exclude=pattern, min_params=0)
