"""Batches of any form, hidden-state distances, ``hidden_state_loss`` and
``token_logits_loss``, against plain computations; a compressed GPT-2 distilled on its
teacher's token predictions."""

import copy

import pytest
import torch
import torch.nn.functional as F
from testkit.sequence import TinyEncoder, TokenBatches, perturbed_copy
from torch.utils.data import DataLoader

import gkpd
from gkpd.train import evaluate, fit, hidden_state_loss, token_logits_loss
from gkpd.train.batches import batch_size, call_model, split_batch, to_device
from gkpd.train.objectives import attention_mask, mean_pool, state_distance, state_tensor


def _record(*args, **kwargs):
    return args, kwargs


def test_split_batch_and_call_model_follow_the_batch_form():
    x, y = torch.ones(3, 2), torch.zeros(3, dtype=torch.long)
    keywords = {"input_ids": x, "attention_mask": y}
    assert split_batch(keywords) == (keywords, None)
    assert split_batch((x, y)) == (x, y)
    assert split_batch([x]) == (x, None)
    assert split_batch(x) == (x, None)
    assert call_model(_record, keywords) == ((), keywords)
    assert call_model(_record, [x, y]) == ((x, y), {})  # the DataLoader's lists: positional
    assert call_model(_record, x) == ((x,), {})
    assert batch_size(keywords) == 3 and batch_size(((x, y), y)) == 3
    with pytest.raises(ValueError, match="3 elements"):
        split_batch((x, y, y))
    with pytest.raises(TypeError, match="batch must be"):
        split_batch("text")
    with pytest.raises(ValueError, match="no batched tensor"):
        batch_size({"flag": True})
    moved = to_device({"a": (x, [y]), "b": 1}, torch.device("cpu"))
    assert torch.equal(moved["a"][0], x) and torch.equal(moved["a"][1][0], y)
    assert isinstance(moved["a"], tuple) and isinstance(moved["a"][1], list) and moved["b"] == 1


def test_a_collated_dict_batch_reaches_the_model_as_keywords():
    batch = next(iter(DataLoader(TokenBatches(8), batch_size=4)))
    inputs, targets = split_batch(batch)
    assert targets is None and set(inputs) == {"input_ids", "attention_mask"}
    assert attention_mask(batch) is batch["attention_mask"]
    assert attention_mask((batch, torch.zeros(4))) is batch["attention_mask"]
    assert attention_mask(batch["input_ids"]) is None
    output = call_model(TinyEncoder(), inputs)
    assert output["last_hidden_state"].shape == (4, 6, 12)


def test_state_tensor_reads_tensors_tuples_and_model_outputs():
    t = torch.randn(2, 3)
    assert state_tensor(t, "x") is t
    assert state_tensor((t, "cache"), "x") is t
    assert state_tensor({"last_hidden_state": t, "pooler_output": t[:, 0]}, "x") is t
    with pytest.raises(ValueError, match="'logits'"):
        state_tensor({"logits": t}, "student output")
    with pytest.raises(ValueError, match="got str"):
        state_tensor("nope", "student output")


def test_masked_distances_match_a_loop_over_the_real_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    tokens = [(b, t) for b in range(3) for t in range(5) if mask[b, t]]
    cosine = sum(1 - F.cosine_similarity(student[b, t], teacher[b, t], dim=0) for b, t in tokens)
    squared = sum(((student[b, t] - teacher[b, t]) ** 2).mean() for b, t in tokens)
    torch.testing.assert_close(
        state_distance(student, teacher, kind="cosine", mask=mask), cosine / len(tokens)
    )
    torch.testing.assert_close(
        state_distance(student, teacher, kind="mse", mask=mask), squared / len(tokens)
    )
    # no mask, or one that does not fit the states (a pooled output): every position counts
    torch.testing.assert_close(
        state_distance(student, teacher, kind="mse"), F.mse_loss(student, teacher)
    )
    torch.testing.assert_close(
        state_distance(student[:, 0], teacher[:, 0], kind="cosine", mask=mask),
        (1 - F.cosine_similarity(student[:, 0], teacher[:, 0], dim=-1)).mean(),
    )
    # an all-ones mask is the plain mean (the classification path's MSE is unchanged)
    torch.testing.assert_close(
        state_distance(student, teacher, kind="mse", mask=torch.ones(3, 5)),
        F.mse_loss(student, teacher),
    )


def test_state_distance_refuses_other_shapes_and_kinds():
    with pytest.raises(ValueError, match=r"student shape \(2, 3\) and teacher shape \(2, 4\)"):
        state_distance(torch.zeros(2, 3), torch.zeros(2, 4), kind="mse")
    with pytest.raises(ValueError, match="kind must be one of"):
        state_distance(torch.zeros(2), torch.zeros(2), kind="l1")
    with pytest.raises(ValueError, match="kind must be one of"):
        hidden_state_loss("l1")


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_hidden_state_loss_is_zero_only_when_student_equals_teacher(kind):
    torch.manual_seed(0)
    teacher = TinyEncoder().eval()
    batch = next(iter(DataLoader(TokenBatches(8), batch_size=8)))
    loss = hidden_state_loss(kind)
    same = loss(copy.deepcopy(teacher)(**batch), teacher(**batch), batch)
    other = loss(perturbed_copy(teacher, 0.3)(**batch), teacher(**batch), batch)
    assert same.abs() < 1e-6
    assert other > 1e-3
    with pytest.raises(ValueError, match="teacher="):
        loss(teacher(**batch), None, batch)


def test_hidden_state_loss_ignores_padding():
    torch.manual_seed(0)
    teacher = TinyEncoder().eval()
    batch = next(iter(DataLoader(TokenBatches(8), batch_size=8)))
    target = teacher(**batch)
    student = {"last_hidden_state": target["last_hidden_state"].clone()}
    padding = batch["attention_mask"] == 0
    assert padding.any()
    student["last_hidden_state"][padding] = torch.randn(int(padding.sum()), 12)
    assert hidden_state_loss("mse")(student, target, batch).abs() < 1e-7


def test_an_encoder_decoders_states_are_masked_by_the_decoders_mask():
    # T5's last_hidden_state and logits are the decoder's: the encoder's attention_mask
    # (here as long as the decoder's input) marks no decoder positions
    torch.manual_seed(0)
    states = torch.randn(2, 4, 6)
    teacher = {"last_hidden_state": states, "encoder_last_hidden_state": torch.randn(2, 4, 6)}
    student = {**teacher, "last_hidden_state": states.clone()}
    student["last_hidden_state"][:, 3] += 1.0  # wrong at the last decoder position only
    encoder_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": encoder_mask}
    assert attention_mask(batch, student) is None
    assert hidden_state_loss("mse")(student, teacher, batch) > 0  # not hidden by the mask
    decoder_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    batch["decoder_attention_mask"] = decoder_mask
    assert attention_mask(batch, student) is decoder_mask
    assert hidden_state_loss("mse")(student, teacher, batch).abs() < 1e-7  # decoder padding
    assert attention_mask(batch, {"last_hidden_state": states}) is encoder_mask


def test_mean_pooled_loss_compares_sentence_embeddings_over_the_real_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long), "attention_mask": mask}
    pooled = [(s[: int(n)].mean(0), t[: int(n)].mean(0))
              for s, t, n in zip(student, teacher, mask.sum(1), strict=True)]
    cosine = sum(1 - F.cosine_similarity(s, t, dim=0) for s, t in pooled) / 3
    squared = sum(((s - t) ** 2).mean() for s, t in pooled) / 3
    outputs = ({"last_hidden_state": student}, {"last_hidden_state": teacher})
    torch.testing.assert_close(hidden_state_loss("cosine", pooling="mean")(*outputs, batch),
                               cosine)
    torch.testing.assert_close(hidden_state_loss("mse", pooling="mean")(*outputs, batch),
                               squared)
    # padding does not reach the embedding; without a mask every token counts
    padded = student.clone()
    padded[mask == 0] = 100.0
    torch.testing.assert_close(mean_pool(padded, mask), mean_pool(student, mask))
    torch.testing.assert_close(mean_pool(student, None), student.mean(1))
    # errors that cancel over a sentence's tokens cost per token, not pooled
    offsets = torch.tensor([1.0, -1.0]).view(1, 2, 1) * torch.ones(3, 2, 4)
    shifted = ({"last_hidden_state": teacher[:, :2] + offsets},
               {"last_hidden_state": teacher[:, :2]})
    assert hidden_state_loss("mse", pooling="mean")(*shifted, teacher[:, :2]).abs() < 1e-6
    assert hidden_state_loss("mse")(*shifted, teacher[:, :2]) > 0.9


def test_mean_pooling_refuses_what_it_cannot_pool():
    with pytest.raises(ValueError, match="pooling must be one of"):
        hidden_state_loss("cosine", pooling="cls")
    with pytest.raises(ValueError, match=r"\(batch, tokens, hidden\) state, got shape \(2, 3\)"):
        mean_pool(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match=r"attention mask shape \(2, 4\)"):
        mean_pool(torch.zeros(2, 3, 5), torch.ones(2, 4))


def test_token_logits_loss_is_the_masked_mean_of_per_token_kl_divergences():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    t = 2.0
    loss = token_logits_loss(t)({"logits": student}, {"logits": teacher}, batch)
    # a loop over the real tokens: KL(teacher || student) of the softened distributions
    terms = []
    for i, j in mask.nonzero().tolist():
        p = F.softmax(teacher[i, j] / t, -1)
        q = F.softmax(student[i, j] / t, -1)
        terms.append((p * (p.log() - q.log())).sum())
    torch.testing.assert_close(loss, torch.stack(terms).mean() * t**2)
    assert token_logits_loss()(teacher, teacher, batch) < 1e-6  # zero at the teacher
    # without a mask every token counts; a tuple's first element is the logits
    every = token_logits_loss(t)((student,), (teacher,), (torch.zeros(2, 4),))
    assert every > 0 and not torch.isclose(every, loss)


def test_token_logits_loss_refuses_what_it_cannot_compare():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        token_logits_loss(0)
    with pytest.raises(ValueError, match="compares with a teacher"):
        token_logits_loss()(logits, None, logits)
    with pytest.raises(ValueError, match=r"mapping without 'logits' \(keys \['hidden'\]\)"):
        token_logits_loss()({"hidden": logits}, logits, logits)
    with pytest.raises(ValueError, match=r"\(batch, tokens, vocabulary\), got \(2, 3, 5\) "
                                         r"and \(2, 3, 4\)"):
        token_logits_loss()(logits, torch.zeros(2, 3, 4), logits)


def test_a_compressed_tiny_gpt2_distils_its_teachers_token_predictions():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=16, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     initializer_range=0.2)  # predictions that differ
    torch.manual_seed(0)
    teacher = transformers.GPT2LMHeadModel(config).eval()
    student, plan = gkpd.compress(teacher, TokenBatches(4)[:], ratio=1.3, min_params=0)
    assert any(e.name.endswith("mlp.c_fc") for e in plan.compressed_layers)  # HF Conv1D
    loss, held_out = token_logits_loss(), DataLoader(TokenBatches(32, seed=1), batch_size=16)
    before = evaluate(student, held_out, teacher=teacher, loss_fn=loss)["loss"]
    fit(student, DataLoader(TokenBatches(64), batch_size=16, shuffle=True), epochs=3,
        teacher=teacher, loss_fn=loss, optimizer="adamw", lr=3e-3, weight_decay=0.0,
        progress=False, device="cpu")
    after = evaluate(student, held_out, teacher=teacher, loss_fn=loss)["loss"]
    assert after < 0.5 * before
