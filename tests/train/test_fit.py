import copy
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gkpd.train import ResumeMismatch, distillation_loss, evaluate, fit
from gkpd.train.checkpoint import check_state_dict_matches, load_state, save_state
from gkpd.train.distributed import DistributedDraw
from gkpd.train.finetune import EpochDraw
from gkpd.train.loop import fit_with
from gkpd.train.options import FitConfig, FitRun

SCRIPT = Path(__file__).with_name("fit_script.py")


def _run_script(*args, **popen):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], **popen)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_fit_lowers_loss_and_evaluate_reports_percent():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    before = evaluate(model, loader)
    history = fit(model, loader, epochs=5, eval_loader=loader, progress=False, lr=0.1, device="cpu")
    assert len(history) == 5
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["eval_accuracy"] > 90.0
    assert 0.0 <= before["accuracy"] <= 100.0


def test_distillation_reaches_student_through_soft_labels_alone():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        teacher[2].weight.mul_(10)  # a confident teacher, as a trained one is
    train_x, held_out_x = torch.randn(4096, 2), torch.randn(512, 2)
    garbage = torch.randint(0, 5, (4096,))  # alpha=1: the hard labels must not matter
    loader = DataLoader(TensorDataset(train_x, garbage), batch_size=64, shuffle=True)
    student = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 5))
    with torch.no_grad():
        agreement_before = student(held_out_x).argmax(1) == teacher(held_out_x).argmax(1)
    fit(
        student,
        loader,
        epochs=10,
        teacher=teacher,
        alpha=1.0,
        temperature=4.0,
        lr=0.05,
        weight_decay=0.0,
        progress=False,
        device="cpu",
    )
    with torch.no_grad():
        agreement = student(held_out_x).argmax(1) == teacher(held_out_x).argmax(1)
    assert agreement_before.float().mean() < 0.6
    assert agreement.float().mean() > 0.97


def test_distillation_loss_is_zero_for_identical_logits_and_mixes_hard_term():
    logits = torch.randn(4, 3)
    targets = torch.tensor([0, 1, 2, 0])
    assert distillation_loss(logits, logits, None, alpha=1.0, temperature=3.0).abs() < 1e-6
    mixed = distillation_loss(logits, logits, targets, alpha=0.25, temperature=3.0)
    hard = nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(mixed, 0.75 * hard)


def test_feature_distillation_checks_module_names():
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    student = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    teacher = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    fit(
        student,
        loader,
        epochs=1,
        teacher=teacher,
        feature_pairs={"0": "0"},
        progress=False,
        device="cpu",
    )
    with pytest.raises(ValueError, match="'nope'"):
        fit(
            student,
            loader,
            epochs=1,
            teacher=teacher,
            feature_pairs={"nope": "0"},
            progress=False,
            device="cpu",
        )


@pytest.mark.parametrize(
    "options, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"epochs": 1, "lr": -1.0}, "lr"),
        ({"epochs": 1, "schedule": "linear"}, "schedule"),
        ({"epochs": 1, "alpha": 2.0}, "alpha"),
        ({"epochs": 1, "momentun": 0.9}, "momentun"),
        ({"epochs": 1, "lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ({"epochs": 1, "lr": "0.1"}, "lr must be a finite number > 0, got '0.1'"),
        ({"epochs": 1, "weight_decay": float("nan")}, "weight_decay must be a finite number"),
        ({"epochs": 1, "temperature": float("inf")}, "temperature must be a finite number"),
        ({"epochs": 1, "warmup_epochs": -1}, "warmup_epochs must be a finite number >= 0"),
        ({"epochs": 1, "gamma": -1.0}, "gamma must be a finite number > 0"),
        ({"epochs": 1, "seed": "x"}, "seed must be an int in \\[0, 2\\*\\*32\\), got 'x'"),
        ({"epochs": 1, "seed": -1}, "seed must be an int"),
        ({"epochs": 1, "seed": 1.5}, "seed must be an int"),
        ({"epochs": 1, "milestones": 0.5}, "milestones must be a sequence of fractions"),
        ({"epochs": 1, "milestones": "ab"}, "milestones must be a sequence of fractions"),
        ({"epochs": 1, "feature_pairs": ["conv1"]}, "feature_pairs must map student module"),
        ({"epochs": 1, "nesterov": "yes"}, "nesterov must be a bool"),
    ],
)
def test_fit_rejects_bad_options(options, match):
    loader = DataLoader(
        TensorDataset(torch.randn(8, 2), torch.zeros(8, dtype=torch.long)), batch_size=4
    )
    with pytest.raises((ValueError, TypeError), match=match):
        fit(nn.Linear(2, 2), loader, progress=False, **options)


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert _run_script(unbroken, 4).wait(timeout=120) == 0

    # Slow batches make an epoch last ~1.6 s, so the kill lands inside epoch 3.
    child = _run_script(broken, 4, "--slow", "0.1")
    deadline = time.time() + 120
    metrics = broken / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    state = load_state(broken / "checkpoint.pt")
    assert 2 <= state["epoch"] < 4, "the kill must land before the run finished"
    assert not (broken / "weights_rank0.pt").exists()

    assert _run_script(broken, 4, "--resume").wait(timeout=120) == 0
    a, b = _weights(unbroken / "weights_rank0.pt"), _weights(broken / "weights_rank0.pt")
    for name, tensor in a["weights"].items():
        assert torch.equal(tensor, b["weights"][name]), name
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


def test_torchrun_two_ranks_end_identical_and_learn(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(SCRIPT),
        str(tmp_path),
        "3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = _weights(tmp_path / "weights_rank0.pt"), _weights(tmp_path / "weights_rank1.pt")
    for name, tensor in rank0["weights"].items():
        assert torch.equal(tensor, rank1["weights"][name]), name
    losses = [h["train_loss"] for h in rank0["history"]]
    assert losses[-1] < losses[0]

    # metrics are reduced over ranks, so both ranks report the same figures
    def figures(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert figures(rank0["history"]) == figures(rank1["history"])
    # each rank saw half the data: 256 samples / 2 ranks / batch 16 = 8 steps per epoch
    assert load_state(tmp_path / "checkpoint.pt")["epoch"] == 3


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    path = save_state(tmp_path / "c.pt", {"model": nn.Linear(3, 4).state_dict()})
    state = load_state(path)
    with pytest.raises(ValueError, match="another architecture"):
        check_state_dict_matches(nn.Linear(3, 5), state["model"], str(path))


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
    path = save_state(tmp_path / "c.pt", {"x": torch.ones(1000)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt"):
        load_state(path)
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "missing.pt")


def test_checkpoint_loader_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("/")}, path)  # an arbitrary class: weights_only must refuse it
    with pytest.raises(ValueError):
        load_state(path)


def test_fit_and_evaluate_take_keyword_batches_and_outputs_with_logits():
    from testkit.keyword_models import KeywordModel, TokenDataset, token_batch

    torch.manual_seed(0)
    data = token_batch(batch=96, length=5)
    labels = data["input_ids"][:, 0] % 2
    loader = DataLoader(TokenDataset(data, labels), batch_size=32, shuffle=True)
    model = KeywordModel(output="dataclass", classes=2)
    history = fit(model, loader, epochs=4, progress=False, lr=0.2, device="cpu")
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    result = evaluate(model, loader)
    with torch.no_grad():
        logits = model(**data).logits
    assert result["count"] == 96
    assert result["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(),
                                           rel=1e-5)
    assert result["accuracy"] == pytest.approx(
        100.0 * (logits.argmax(1) == labels).float().mean().item())
    student = KeywordModel(output="dict", classes=2)  # a dict output with logits distils too
    history = fit(student, loader, epochs=1, teacher=model, alpha=1.0, progress=False,
                  device="cpu")
    assert math.isfinite(history[0]["train_loss"])


def test_fit_refuses_an_output_without_class_scores():
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)),
                        batch_size=4)

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return {"features": self.fc(x)}

    with pytest.raises(TypeError, match="'logits' tensor; got dict"):
        evaluate(Features(), loader)


def _blobs_loader(batch_size=8, samples=None):
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    sampler = torch.utils.data.RandomSampler(data, num_samples=samples)
    return DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=True)


def test_resume_refuses_other_settings_and_names_them(tmp_path):
    model = nn.Linear(4, 2)
    fit(model, _blobs_loader(), epochs=2, checkpoint_dir=tmp_path, progress=False,
        device="cpu", lr=0.05)
    state = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ResumeMismatch, match=r"lr: 0\.05 recorded, 0\.1 given") as info:
        fit(model, _blobs_loader(samples=32), epochs=2, checkpoint_dir=tmp_path, resume=True,
            progress=False, device="cpu", lr=0.1)
    assert info.value.changes == {"lr": (0.05, 0.1), "samples_per_epoch": (64, 32)}
    with pytest.raises(ResumeMismatch) as info:
        fit(model, _blobs_loader(batch_size=16), epochs=3, checkpoint_dir=tmp_path,
            resume=True, teacher=nn.Linear(4, 2), progress=False, device="cpu", lr=0.05)
    assert info.value.changes == {
        "epochs": (2, 3), "batch_size": (8, 16), "distillation": (False, True)
    }
    assert (tmp_path / "checkpoint.pt").read_bytes() == state  # refused before any change
    # the same settings resume (here: a finished run, nothing left to do)
    history = fit(model, _blobs_loader(), epochs=2, checkpoint_dir=tmp_path, resume=True,
                  progress=False, device="cpu", lr=0.05)
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_without_a_checkpoint_trains_from_the_start_and_says_so(tmp_path, caplog):
    torch.manual_seed(0)
    resumed = nn.Linear(4, 2)
    fresh = copy.deepcopy(resumed)
    with caplog.at_level(logging.INFO, logger="gkpd.train.loop"):
        history = fit(resumed, _blobs_loader(), epochs=1, checkpoint_dir=tmp_path / "run",
                      resume=True, progress=False, device="cpu", lr=0.05)
    assert [h["epoch"] for h in history] == [1]
    assert "no checkpoint at" in caplog.text and "training from the start" in caplog.text
    fit(fresh, _blobs_loader(), epochs=1, progress=False, device="cpu", lr=0.05)
    assert torch.equal(resumed.weight, fresh.weight)


def test_a_list_of_batches_trains_and_other_loaders_are_named(tmp_path):
    torch.manual_seed(0)
    batches = list(_blobs_loader())
    model = nn.Linear(4, 2)
    before = model.weight.detach().clone()
    history = fit(model, batches, epochs=2, checkpoint_dir=tmp_path, progress=False,
                  device="cpu", lr=0.05)
    assert [h["epoch"] for h in history] == [1, 2] and not torch.equal(model.weight, before)
    again = fit(model, batches, epochs=2, checkpoint_dir=tmp_path, resume=True,
                progress=False, device="cpu", lr=0.05)  # finished: nothing left to do
    assert [h["epoch"] for h in again] == [1, 2]
    for loader in (torch.randn(8, 4), iter(batches), 3):
        with pytest.raises(TypeError, match="train_loader must be a DataLoader or a sized "
                                            "iterable"):
            fit(nn.Linear(4, 2), loader, epochs=1, progress=False, device="cpu")


def test_after_epoch_may_resize_the_next_draw_and_the_schedule_follows():
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader = DataLoader(data, batch_size=8, sampler=EpochDraw(data, 64))  # 8 steps, then 4, then 2
    steps = []
    model = nn.Linear(4, 2)
    model.register_forward_hook(lambda *_: steps.append(1))
    config = FitConfig(epochs=3, lr=0.1)

    def halve(record):
        loader.sampler.samples //= 2

    history = fit_with(model, loader, config,
                       FitRun(progress=False, device="cpu", after_epoch=halve))
    assert len(steps) == 8 + 4 + 2
    # each epoch's last learning rate is the cosine schedule's at that fraction of training
    for record, per_epoch in zip(history, (8, 4, 2), strict=True):
        last = record["epoch"] * per_epoch - 1
        assert record["lr"] == pytest.approx(config.lr_at(last, 3 * per_epoch, per_epoch))
        assert record["lr"] == pytest.approx(
            0.1 * 0.5 * (1 + math.cos(math.pi * (record["epoch"] - 1 / per_epoch) / 3))
        )


def test_weights_that_diverge_in_an_epochs_last_step_end_the_run_with_the_last_checkpoint(
    tmp_path,
):
    """The loss is checked before each step; a last step that makes the weights infinite is
    caught before they are evaluated or checkpointed (one step of 1e30 x gradients of 1e10
    overflows float32)."""
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(1e10 * torch.randn(8, 4), torch.randint(0, 2, (8,))),
                        batch_size=8)  # one step an epoch: the last is the first
    with pytest.raises(FloatingPointError, match="became NaN or infinite during epoch 1"):
        fit(nn.Linear(4, 2), loader, epochs=2, checkpoint_dir=tmp_path / "big",
            progress=False, device="cpu", lr=1e30, schedule="constant")
    assert not (tmp_path / "big" / "checkpoint.pt").exists()
    assert not (tmp_path / "big" / "metrics.jsonl").exists()


def test_resume_refuses_another_teacher(tmp_path):
    torch.manual_seed(0)
    teacher, other = nn.Linear(4, 2), nn.Linear(4, 2)
    fit(nn.Linear(4, 2), _blobs_loader(), epochs=1, teacher=teacher, checkpoint_dir=tmp_path,
        progress=False, device="cpu")
    with pytest.raises(ResumeMismatch) as info:
        fit(nn.Linear(4, 2), _blobs_loader(), epochs=1, teacher=other, checkpoint_dir=tmp_path,
            resume=True, progress=False, device="cpu")
    assert set(info.value.changes) == {"teacher"}
    fit(nn.Linear(4, 2), _blobs_loader(), epochs=1, teacher=copy.deepcopy(teacher),
        checkpoint_dir=tmp_path, resume=True, progress=False, device="cpu")  # the same one


@pytest.mark.parametrize("samples, world", [(10, 2), (64, 3), (100, 2)])
def test_each_rank_reads_its_share_of_one_draw_per_epoch(samples, world):
    """torchrun: every rank draws the same items (as many as the loader's own sampler, e.g.
    --train-subset) and reads every world-th; the draw changes with the epoch."""
    data = TensorDataset(torch.arange(40))
    draw = EpochDraw(data, samples)
    shares = [DistributedDraw(data, draw, seed=3, rank=r, world=world) for r in range(world)]
    epochs = []
    for epoch in range(2):
        for share in shares:
            share.set_epoch(epoch)
        read = [list(share) for share in shares]
        assert all(len(r) == len(shares[0]) == -(-samples // world) for r in read)
        together = [i for position in zip(*read, strict=True) for i in position][:samples]
        assert len(together) == samples and all(0 <= i < 40 for i in together)
        if samples <= 40:
            assert len(set(together)) == samples  # a draw without repeats
        epochs.append(together)
    assert epochs[0] != epochs[1]


def test_a_frozen_model_or_a_teacher_of_another_dtype_is_refused():
    loader = _blobs_loader()
    frozen = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit(frozen, loader, epochs=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match="the model is torch.float64 and the teacher "
                       "torch.float32"):
        fit(nn.Linear(4, 2).double(), loader, epochs=1, teacher=nn.Linear(4, 2),
            progress=False, device="cpu")


def test_an_eval_loader_of_the_wrong_kind_is_refused_before_training(tmp_path):
    model = nn.Linear(4, 2)
    with pytest.raises(TypeError, match="eval_loader must be a DataLoader or an iterable"):
        fit(model, _blobs_loader(), epochs=1, eval_loader=5, progress=False, device="cpu",
            checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failed_evaluation_keeps_the_epoch_it_followed(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    complete = copy.deepcopy(model)
    inputs_only = [(x,) for x, _ in _blobs_loader()]  # no targets: evaluate refuses them
    with pytest.raises(ValueError, match="needs \\(inputs, targets\\)") as raised:
        fit(model, _blobs_loader(), epochs=2, eval_loader=inputs_only, progress=False,
            device="cpu", lr=0.05, checkpoint_dir=tmp_path / "run")
    assert any("its training is kept" in note for note in raised.value.__notes__)
    assert load_state(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    history = fit(model, _blobs_loader(), epochs=2, progress=False, device="cpu", lr=0.05,
                  checkpoint_dir=tmp_path / "run", resume=True)
    assert [h["epoch"] for h in history] == [1, 2]
    fit(complete, _blobs_loader(), epochs=2, progress=False, device="cpu", lr=0.05)
    torch.testing.assert_close(model.weight, complete.weight)


def test_resume_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="resume must be a bool, got 'no'"):
        fit(nn.Linear(4, 2), _blobs_loader(), epochs=1, resume="no", progress=False,
            checkpoint_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sgd_without_momentum_trains_plainly():
    """Nesterov (on by default) needs a momentum; with momentum=0 the step is plain SGD
    (torch refuses nesterov=True with it)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    plain = copy.deepcopy(model)
    fit(model, _blobs_loader(), epochs=1, momentum=0.0, weight_decay=0.0, lr=0.05,
        schedule="constant", progress=False, device="cpu")
    fit(plain, _blobs_loader(), epochs=1, momentum=0.0, nesterov=False, weight_decay=0.0,
        lr=0.05, schedule="constant", progress=False, device="cpu")
    torch.testing.assert_close(model.weight, plain.weight)


def test_pure_distillation_trains_on_unlabelled_batches():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3)
    student = nn.Linear(4, 3)
    unlabelled = [(x,) for x, _ in _blobs_loader()]
    x = torch.randn(64, 4)

    def gap():
        with torch.no_grad():
            return (student(x).softmax(1) - teacher(x).softmax(1)).abs().mean().item()

    before = gap()
    history = fit(student, unlabelled, epochs=3, teacher=teacher, alpha=1.0, lr=0.1,
                  progress=False, device="cpu")
    assert gap() < before / 2
    assert "train_accuracy" not in history[-1] and math.isfinite(history[-1]["train_loss"])
    with pytest.raises(ValueError, match=r"no targets.*alpha=1"):
        fit(student, unlabelled, epochs=1, teacher=teacher, alpha=0.9, progress=False,
            device="cpu")
