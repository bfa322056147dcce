"""KroneckerEmbedding against its oracle, ``nn.Embedding`` with the reconstructed table: outputs,
gradients, the padding row, the settings it refuses; and in planning, counting and saving."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from testkit import divisors
from testkit.tiny_bert import tiny_bert, tiny_bert_config, token_batch
from torch import nn

import gkpd
from gkpd.counting import count_model
from gkpd.export import merge

f64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def embedding_configs(draw):
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, 24))
    a_shape = (draw(st.sampled_from(divisors(n))), draw(st.sampled_from(divisors(d))))
    padding = draw(st.one_of(st.none(), st.integers(-n, n - 1)))
    ids_shape = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(0, 3))))
    return n, d, a_shape, padding, ids_shape


@settings(deadline=None, max_examples=150)
@given(embedding_configs(), st.integers(0, 2**31), st.data())
def test_exact_at_full_rank_and_the_oracle_at_any_rank(cfg, seed, data):
    n, d, a_shape, padding, ids_shape = cfg
    torch.manual_seed(seed)
    dense = nn.Embedding(n, d, padding_idx=padding, dtype=f64)
    with torch.no_grad():  # a padding row that is not zero, as a trained table may have
        dense.weight.normal_()
    ids = torch.randint(0, n, ids_shape)
    if padding is not None and ids.numel():
        ids.view(-1)[0] = padding % n
    full = gkpd.KroneckerEmbedding.from_dense(dense, a_shape=a_shape)
    torch.testing.assert_close(full(ids), dense(ids), rtol=1e-10, atol=1e-10)
    assert full(ids).shape == (*ids_shape, d)

    b_shape = full.b_shape
    rank = data.draw(st.integers(1, min(math.prod(a_shape), math.prod(b_shape))))
    layer = gkpd.KroneckerEmbedding.from_dense(dense, a_shape=a_shape, rank=rank)
    oracle = layer.to_dense()
    out = layer(ids)
    torch.testing.assert_close(out, oracle(ids), rtol=1e-10, atol=1e-12)
    # gradients: through the reconstructed table, the padding row fixed
    grad_out = torch.randn_like(out)
    reference = F.embedding(ids, layer.reconstruct_weight(), padding_idx=layer.padding_idx)
    expected = torch.autograd.grad(reference, [layer.a, layer.b], grad_out)
    got = torch.autograd.grad(out, [layer.a, layer.b], grad_out)
    for g, r in zip(got, expected, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_the_padding_row_is_fixed_and_gets_no_gradient():
    torch.manual_seed(0)
    dense = nn.Embedding(12, 6, padding_idx=3)
    layer = gkpd.KroneckerEmbedding.from_dense(dense, a_shape=(3, 2), rank=1)
    assert torch.equal(layer(torch.tensor([3])), dense(torch.tensor([3])))  # zeros
    assert torch.equal(layer.reconstruct_weight()[3], torch.zeros(6))
    out = layer(torch.tensor([3, 3]))
    out.sum().backward()
    assert layer.a.grad.abs().max() == 0 and layer.b.grad.abs().max() == 0
    fresh = gkpd.KroneckerEmbedding(12, 6, padding_idx=-1, a_shape=(3, 2), rank=2)
    assert fresh.padding_idx == 11 and torch.equal(fresh(torch.tensor([11])), torch.zeros(1, 6))


@pytest.mark.parametrize("setting,match", [
    ({"max_norm": 1.0}, "max_norm=1.0 renormalises"),
    ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
    ({"sparse": True}, "sparse"),
])
def test_settings_it_cannot_honour_are_refused(setting, match):
    dense = nn.Embedding(8, 4, **setting)
    with pytest.raises(ValueError, match=match):
        gkpd.KroneckerEmbedding.from_dense(dense, a_shape=(2, 2))
    with pytest.raises(ValueError, match=match):
        gkpd.KroneckerEmbedding(8, 4, a_shape=(2, 2), rank=1, **setting)
    assert match.split("=")[0] in gkpd.methods.GKPD().supports(dense)


def test_bad_arguments_get_clear_errors():
    with pytest.raises(ValueError, match="does not divide|divide"):
        gkpd.KroneckerEmbedding(10, 4, a_shape=(3, 2), rank=1)
    with pytest.raises(ValueError, match="padding_idx must be an int in"):
        gkpd.KroneckerEmbedding(10, 4, padding_idx=10, a_shape=(2, 2), rank=1)
    with pytest.raises(TypeError, match="nn.Embedding"):
        gkpd.KroneckerEmbedding.from_dense(nn.Linear(4, 4), a_shape=(2, 2))
    layer = gkpd.KroneckerEmbedding(10, 4, a_shape=(2, 2), rank=1)
    for ids in (torch.tensor([10]), torch.tensor([-1])):  # as nn.Embedding: out of range
        with pytest.raises(IndexError):
            layer(ids)


def test_init_has_the_variance_of_nn_embedding_and_state_dict_round_trips():
    torch.manual_seed(0)
    layer = gkpd.KroneckerEmbedding(64, 48, padding_idx=0, a_shape=(8, 6), rank=4)
    assert layer.reconstruct_weight()[1:].var().item() == pytest.approx(1.0, rel=0.15)
    other = gkpd.KroneckerEmbedding(64, 48, padding_idx=0, a_shape=(8, 6), rank=4)
    other.load_state_dict(layer.state_dict())
    ids = torch.randint(0, 64, (3, 5))
    torch.testing.assert_close(other(ids), layer(ids))
    assert set(layer.state_dict()) == {"a", "b", "padding_row"}


def test_tracing_and_export():
    model = nn.Sequential(gkpd.KroneckerEmbedding(12, 6, padding_idx=0, a_shape=(3, 2), rank=2),
                          nn.Linear(6, 3))
    ids = torch.tensor([[0, 3, 5], [11, 1, 0]])
    graph = torch.fx.symbolic_trace(model)  # the layer is one call, as nn.Embedding is
    assert [n.op for n in graph.graph.nodes].count("call_module") == 2
    for traced in (graph, torch.jit.trace(model, ids), torch.export.export(model, (ids,)).module()):
        torch.testing.assert_close(traced(ids), model(ids))
    with pytest.raises(TypeError, match="torch.jit.script cannot compile KroneckerEmbedding"):
        torch.jit.script(model)


def test_counting_a_lookup():
    layer = gkpd.KroneckerEmbedding(64, 48, a_shape=(8, 6), rank=3)
    model = nn.Sequential(layer)
    ids = torch.randint(0, 64, (2, 5))
    assert layer.macs(ids.shape) == 2 * 5 * 3 * 48  # R outer products of 6 and 8 per token
    counted = count_model(model, ids)
    assert counted["0"].macs == layer.macs(ids.shape)
    assert counted.total_params == 3 * (8 * 6 + 8 * 8)
    assert count_model(nn.Sequential(nn.Embedding(64, 48)), ids).total_macs == 0  # a lookup


# ----------------------------------------------------------------------------- in a model


def test_planning_compresses_embeddings_and_the_result_saves_and_loads(tmp_path):
    model = tiny_bert()
    inputs = token_batch()
    compressed, plan = gkpd.compress(model, inputs, ratio=1.5)
    entry = plan.layer("embeddings.word_embeddings")
    assert entry.compressed and entry.dense_macs == 0 and "path" not in entry.settings
    layer = compressed.embeddings.word_embeddings
    assert isinstance(layer, gkpd.KroneckerEmbedding) and layer.padding_idx == 0
    dense = model.embeddings.word_embeddings.weight.detach()
    measured = float((layer.reconstruct_weight().detach() - dense).norm() / dense.norm())
    assert measured == pytest.approx(entry.relative_error, rel=1e-3, abs=1e-5)
    assert sum(p.numel() for p in compressed.parameters()) == plan.params
    gkpd.save(tmp_path / "saved", compressed, plan)
    loaded = gkpd.load(tmp_path / "saved", tiny_bert())
    merged = merge(compressed)  # back to nn.Embedding, padding index kept
    assert merged.embeddings.word_embeddings.padding_idx == 0
    with torch.no_grad():
        expected = compressed(*inputs).last_hidden_state
        torch.testing.assert_close(loaded(*inputs).last_hidden_state, expected)
        torch.testing.assert_close(merged(*inputs).last_hidden_state, expected)


def test_full_rank_embeddings_reproduce_the_model():
    model = tiny_bert().double()
    inputs = token_batch()
    plan = gkpd.plan(model, inputs, ratio=1.2, include=["re:embeddings\\..*"], min_params=0)
    for entry in plan.compressed_layers:
        entry.settings["rank"] = min(map(math.prod, (entry.settings["a_shape"],
                                                     entry.settings["b_shape"])))
    compressed = gkpd.apply_(copy.deepcopy(model), plan)
    with torch.no_grad():
        torch.testing.assert_close(compressed(*inputs).last_hidden_state,
                                   model(*inputs).last_hidden_state, rtol=1e-9, atol=1e-9)


def test_tied_weights_are_never_silently_untied():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(tiny_bert_config()).eval()
    word, decoder = "bert.embeddings.word_embeddings", "cls.predictions.decoder"
    assert model.get_submodule(decoder).weight is model.get_submodule(word).weight
    plan = gkpd.plan(model, token_batch(), ratio=1.3)
    for name in (word, decoder):
        assert not plan.layer(name).compressed and "tied" in plan.layer(name).reason
    with pytest.raises(ValueError, match="tied to cls.predictions.decoder"):
        gkpd.plan(model, token_batch(), ratio=1.3, overrides={word: {"a_shape": (1, 32)}})
    # a plan that compresses a tied layer (made before the weights were tied) is refused
    untied = transformers.BertForMaskedLM(tiny_bert_config(tie_word_embeddings=False)).eval()
    plan = gkpd.plan(untied, token_batch(), ratio=1.05, include=[word])
    assert plan.layer(word).compressed
    with pytest.raises(ValueError, match="tied"):
        gkpd.apply_(copy.deepcopy(model), plan)


def test_a_module_reached_by_two_names_stays_dense():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(32, 32))
    plan = gkpd.plan(model, torch.randn(2, 32), ratio=1.5, tolerance=0.2)
    assert not plan.layer("0").compressed and "tied to 2" in plan.layer("0").reason
    assert plan.layer("4").compressed


def test_embeddings_with_calibration_data_and_the_latency_objective(monkeypatch):
    model, inputs = tiny_bert(), token_batch()
    word = "embeddings.word_embeddings"
    # calibration: the linears are whitened, the embeddings (token ids in) keep plain factors
    ids = torch.randint(1, 96, (8, 12), generator=torch.Generator().manual_seed(2))
    small, plan = gkpd.compress(model, inputs, ratio=1.5, calibration=ids)
    assert plan.layer(word).compressed and "init" not in plan.layer(word).settings
    assert plan.layer("encoder.layer.0.attention.self.query").settings["init"] == "whitened"
    assert isinstance(small.get_submodule(word), gkpd.KroneckerEmbedding)
    # latency: a lookup has one way to run, so it keeps its pick untimed
    from gkpd.plan import latency_objective

    timed = []
    monkeypatch.setattr(latency_objective.LayerTimer, "times",
                        lambda self, module, shape, options: timed.append(module)
                        or dict.fromkeys(options, 1e-3))
    plan = gkpd.plan(model, inputs, ratio=1.5, objective=gkpd.LatencyObjective(cache=None))
    assert plan.layer(word).compressed and plan.layer(word).settings["rank"]
    assert timed and not any(isinstance(m, nn.Embedding) for m in timed)
