"""Models whose parameters sit in recurrent layers compress with the defaults: an LSTM text
classifier at 2x by gkpd and svd (train/eval outputs, backward, save/load, merge, MACs), a
bidirectional, sequence-first GRU, and a decoder that loops an LSTMCell itself."""

import pytest
import torch
from torch import nn

import gkpd
from gkpd.counting import count_model
from gkpd.export import merge
from gkpd.layers.recurrent import UnpackedGRU, UnpackedLSTM
from gkpd.layers.recurrent_cells import UnpackedLSTMCell

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, BATCH, LENGTH = 50, 4, 7


class TextLSTM(nn.Module):
    """Embedding, a 2-layer LSTM (94% of the parameters), a linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True, dropout=0.1)
        self.head = nn.Linear(32, 3)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense():
    torch.manual_seed(0)
    return TextLSTM()


@pytest.mark.parametrize("method", ["gkpd", "svd"])
def test_text_lstm_compresses_2x_with_defaults(dense, method, tmp_path):
    x = _ids()
    options = {} if method == "gkpd" else {"method": method}
    compressed, plan = gkpd.compress(dense, x, ratio=2, **options)
    assert abs(plan.achieved_ratio - 2) <= 0.03 * 2
    assert isinstance(dense.lstm, nn.LSTM)  # the original is untouched
    assert isinstance(compressed.lstm, UnpackedLSTM)
    assert {e.name for e in plan.compressed_layers} == {
        "lstm.l0.ih", "lstm.l0.hh", "lstm.l1.ih", "lstm.l1.hh"}
    assert not any("LSTM" in note for note in plan.notes)
    # per sample: ih on the whole sequence, hh once per step
    assert plan.layers[1].input_shape == (1, LENGTH, 16) and plan.layers[1].dense_macs == (
        LENGTH * 16 * 128)
    assert plan.layers[2].input_shape == (1, 32) and plan.layers[2].dense_macs == (
        LENGTH * 32 * 128)
    assert count_model(compressed, x).total_macs == plan.macs * BATCH
    assert count_model(dense, x).total_macs == plan.dense_macs * BATCH
    for training in (True, False):
        out = compressed.train(training)(x)
        assert out.shape == (BATCH, 3) and torch.isfinite(out).all()
    compressed.train()
    compressed(x).square().sum().backward()
    assert all(p.grad is not None for p in compressed.lstm.parameters())
    gkpd.save(tmp_path / "saved", compressed.eval(), plan)
    loaded = gkpd.load(tmp_path / "saved", TextLSTM()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x))


def test_merge_gives_back_an_lstm_where_the_gates_are_kronecker(dense):
    x = _ids(1)
    compressed, _ = gkpd.compress(dense, _ids(), ratio=2)
    merged = merge(compressed.eval())
    assert type(merged.lstm) is nn.LSTM and merged.lstm.dropout == 0.1
    with torch.no_grad():
        torch.testing.assert_close(merged(x), compressed(x), rtol=1e-4, atol=1e-5)
    svd, _ = gkpd.compress(dense, _ids(), ratio=2, method="svd")
    assert isinstance(merge(svd).lstm, UnpackedLSTM)  # svd's two linears have no dense form


class Tagger(nn.Module):
    """A bidirectional GRU on (L, N, E) inputs, a per-step head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(24, 32, bidirectional=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.gru(x)[0])


def test_a_bidirectional_sequence_first_gru_compresses():
    torch.manual_seed(0)
    model, x = Tagger(), torch.randn(LENGTH, BATCH, 24)
    compressed, plan = gkpd.compress(model, x, ratio=2)
    assert abs(plan.achieved_ratio - 2) <= 0.03 * 2
    assert isinstance(compressed.gru, UnpackedGRU)
    assert "gru.l0_reverse.hh" in {e.name for e in plan.compressed_layers}
    out = compressed(x)
    assert out.shape == (LENGTH, BATCH, 5) and torch.isfinite(out).all()


class Decoder(nn.Module):
    """An LSTMCell called at every step of the model's own loop (97% of the parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(16, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0])


def test_a_cell_called_in_the_models_own_loop_compresses(tmp_path):
    torch.manual_seed(0)
    model, x = Decoder(), torch.randn(BATCH, LENGTH, 16)
    compressed, plan = gkpd.compress(model, x, ratio=2)
    assert abs(plan.achieved_ratio - 2) <= 0.03 * 2
    assert isinstance(model.cell, nn.LSTMCell) and isinstance(compressed.cell, UnpackedLSTMCell)
    assert {e.name for e in plan.compressed_layers} == {"cell.ih", "cell.hh"}
    assert not plan.notes  # nothing left that no method compresses
    ih = next(e for e in plan.layers if e.name == "cell.ih")
    assert ih.input_shape == (1, 16) and ih.dense_macs == LENGTH * 16 * 4 * 64  # every call
    assert count_model(model, x).total_macs == plan.dense_macs * BATCH
    assert count_model(compressed, x).total_macs == plan.macs * BATCH
    compressed(x).square().sum().backward()
    assert all(p.grad is not None for p in compressed.cell.parameters())
    gkpd.save(tmp_path / "saved", compressed.eval(), plan)
    loaded = gkpd.load(tmp_path / "saved", Decoder()).eval()
    merged = merge(compressed)
    assert type(merged.cell) is nn.LSTMCell
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), compressed(x))
        torch.testing.assert_close(merged(x), compressed(x), rtol=1e-4, atol=1e-5)
