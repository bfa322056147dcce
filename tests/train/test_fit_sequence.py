"""``fit`` and ``evaluate`` on models called with keyword inputs, trained on a user's loss with
the teacher's hidden states as targets (a tiny dict-output encoder, a tiny random BERT)."""

import pytest
import torch
from testkit.sequence import TinyEncoder, TokenBatches, perturbed_copy
from torch import nn
from torch.utils.data import DataLoader, Dataset

import gkpd
from gkpd.train import ResumeMismatch, evaluate, fit, hidden_state_loss
from gkpd.train.checkpoint import load_state

pytestmark = pytest.mark.usefixtures("one_thread")


def _distil(student, teacher, loader, **options):
    settings = dict(
        epochs=3, teacher=teacher, loss_fn=hidden_state_loss("cosine"),
        feature_pairs={"mix": "mix"}, feature_loss="cosine", optimizer="adamw", lr=0.01,
        weight_decay=0.0, device="cpu", progress=False, seed=3,
    )
    return fit(student, loader, **{**settings, **options})


def test_distillation_on_hidden_states_trains_the_student_only():
    torch.manual_seed(0)
    teacher = TinyEncoder()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = perturbed_copy(teacher, 0.3)
    loader = DataLoader(TokenBatches(256), batch_size=16, shuffle=True)
    held_out = DataLoader(TokenBatches(32, seed=1), batch_size=16)
    loss = hidden_state_loss("cosine")
    before = evaluate(student, held_out, teacher=teacher, loss_fn=loss)["loss"]

    history = _distil(student, teacher, loader, epochs=6, eval_loader=held_out,
                      metrics={"mse": hidden_state_loss("mse")})

    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    # no gradient reached the teacher, whose parameters were left trainable (copies of it
    # made later, as students, must train)
    assert all(p.grad is None and p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    after = evaluate(student, held_out, teacher=teacher, loss_fn=loss)["loss"]
    assert after < 0.3 * before
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    record = history[-1]
    assert {"eval_loss", "eval_mse", "train_loss"} <= set(record)
    assert not any("accuracy" in key for key in record)


def test_evaluate_weighs_a_users_loss_and_metrics_by_batch_size():
    torch.manual_seed(0)
    teacher = TinyEncoder()
    student = perturbed_copy(teacher, 0.2)
    data = TokenBatches(12)
    loader = DataLoader(data, batch_size=5)  # batches of 5, 5 and 2
    loss = hidden_state_loss("mse")
    result = evaluate(student, loader, teacher=teacher, loss_fn=loss,
                      metrics={"cosine": hidden_state_loss("cosine")})
    with torch.no_grad():
        per_batch = [(loss(student(**b), teacher(**b), b).item(), len(b["input_ids"]))
                     for b in loader]
    expected = sum(v * n for v, n in per_batch) / 12
    assert result["count"] == 12 and "accuracy" not in result
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert 0 < result["cosine"] < 1
    with pytest.raises(ValueError, match="loss_fn="):
        evaluate(student, loader)  # dict batches carry no targets
    with pytest.raises(ValueError, match="may not be named"):
        evaluate(student, loader, loss_fn=loss, metrics={"loss": loss})


class _Interrupt(Exception):
    pass


def _interrupting(loss_fn, calls: int):
    seen = []

    def wrapped(student_output, teacher_output, batch):
        seen.append(1)
        if len(seen) > calls:
            raise _Interrupt
        return loss_fn(student_output, teacher_output, batch)

    return wrapped


def test_an_interrupted_distillation_resumes_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    teacher = TinyEncoder()

    def data():  # shuffled, and the student has dropout: resume must restore the RNG
        return DataLoader(TokenBatches(48), batch_size=8, shuffle=True, drop_last=True)

    def student(seed):
        model = perturbed_copy(teacher, 0.3, seed=seed)
        model.drop.p = 0.2
        return model

    unbroken = student(seed=1)
    history = _distil(unbroken, teacher, data(), checkpoint_dir=tmp_path / "a")

    broken = tmp_path / "b"
    with pytest.raises(_Interrupt):  # in the middle of epoch 2 (6 steps per epoch)
        _distil(student(seed=1), teacher, data(), checkpoint_dir=broken,
                loss_fn=_interrupting(hidden_state_loss("cosine"), 8))
    assert load_state(broken / "checkpoint.pt")["epoch"] == 1
    resumed = student(seed=2)  # other weights: the checkpoint's must replace them
    resumed_history = _distil(resumed, teacher, data(), checkpoint_dir=broken, resume=True)

    for name, value in unbroken.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in resumed_history]
    with pytest.raises(ResumeMismatch, match="optimizer: 'adamw' recorded, 'sgd' given"):
        _distil(student(seed=1), teacher, data(), checkpoint_dir=broken, resume=True,
                optimizer="sgd")


def test_bad_sequence_training_input_gets_clear_errors():
    teacher, student = TinyEncoder(dim=8), TinyEncoder(dim=12)
    loader = DataLoader(TokenBatches(8), batch_size=4)
    with pytest.raises(ValueError, match="no targets.*loss_fn="):
        fit(student, loader, epochs=1, progress=False, device="cpu")
    with pytest.raises(TypeError, match="loss_fn must return a scalar tensor"):
        fit(student, loader, epochs=1, progress=False, device="cpu",
            loss_fn=lambda output, _teacher, _batch: output["last_hidden_state"])
    with pytest.raises(ValueError, match="feature_pairs.*teacher="):
        fit(student, loader, epochs=1, progress=False, device="cpu",
            loss_fn=lambda output, _t, _b: output["last_hidden_state"].sum(),
            feature_pairs={"mix": "mix"})
    with pytest.raises(ValueError, match=r"'mix' -> 'mix'.*\(4, 6, 12\).*\(4, 6, 8\)"):
        fit(student, loader, epochs=1, progress=False, device="cpu", teacher=teacher,
            loss_fn=lambda output, _t, _b: output["last_hidden_state"].sum() * 0,
            feature_pairs={"mix": "mix"})
    with pytest.raises(ValueError, match="last hidden state.*differ"):
        fit(student, loader, epochs=1, progress=False, device="cpu", teacher=teacher,
            loss_fn=hidden_state_loss())
    with pytest.raises(ValueError, match="feature_loss"):
        fit(student, loader, epochs=1, progress=False, feature_loss="l2")
    with pytest.raises(ValueError, match="optimizer"):
        fit(student, loader, epochs=1, progress=False, optimizer="adam")


class _Labelled(Dataset):
    """``(keyword inputs, label)``: the label says whether the first token is >= 20."""

    def __init__(self, count: int) -> None:
        self.tokens = TokenBatches(count)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i):
        sample = self.tokens[i]
        return sample, int(sample["input_ids"][0] >= 20)


class _Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = TinyEncoder()
        self.head = nn.Linear(12, 2)

    def forward(self, input_ids, attention_mask):
        return self.head(self.encoder(input_ids, attention_mask)["last_hidden_state"][:, 0])


def test_a_classifier_with_keyword_inputs_keeps_the_classification_path():
    torch.manual_seed(0)
    loader = DataLoader(_Labelled(128), batch_size=16, shuffle=True)
    model = _Classifier()
    history = fit(model, loader, epochs=10, eval_loader=loader, lr=0.1, progress=False,
                  device="cpu")
    assert history[-1]["eval_accuracy"] > 90.0
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"]


def test_a_compressed_tiny_bert_distils_from_its_teacher():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, initializer_range=0.2,  # blocks that matter
    )
    torch.manual_seed(0)
    teacher = transformers.BertModel(config).eval()
    example = TokenBatches(4)[:]  # one dict of (4, 6) tensors
    student, plan = gkpd.compress(
        teacher, example, ratio=1.5, method="svd", include=["re:encoder\\..*"], min_params=0,
    )
    assert plan.compressed_layers
    held_out = DataLoader(TokenBatches(32, seed=1), batch_size=16)
    loss = hidden_state_loss("cosine")
    before = evaluate(student, held_out, teacher=teacher, loss_fn=loss)["loss"]
    fit(student, DataLoader(TokenBatches(64), batch_size=16, shuffle=True), epochs=4,
        teacher=teacher, loss_fn=loss, optimizer="adamw", lr=3e-3, weight_decay=0.0,
        feature_pairs={"encoder.layer.0": "encoder.layer.0"}, feature_loss="cosine",
        progress=False, device="cpu")
    after = evaluate(student, held_out, teacher=teacher, loss_fn=loss)["loss"]
    assert after < 0.5 * before
    assert all(p.grad is None for p in teacher.parameters())
