"""UnpackedLSTM / UnpackedGRU / UnpackedRNN compute what torch's modules compute (the oracle:
float64, every option), convert back, and refuse bad input with clear errors."""

import pytest
import torch
from testkit import assert_converts_back, assert_same_outputs
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from gkpd.layers import KroneckerLinear, attention
from gkpd.layers.recurrent import UnpackedGRU, UnpackedLSTM, UnpackedRNN

pytestmark = pytest.mark.usefixtures("one_thread")

IN, H, T, N = 3, 4, 5, 2
KINDS = {"lstm": (nn.LSTM, UnpackedLSTM), "gru": (nn.GRU, UnpackedGRU),
         "rnn": (nn.RNN, UnpackedRNN)}


def _pair(kind, **options):
    torch.manual_seed(0)
    reference = KINDS[kind][0](IN, H, **options).double()
    return reference, KINDS[kind][1].from_torch(reference)


def _states(kind, reference, batched=True):
    """Random initial states of ``reference``'s shapes (``(h_0, c_0)`` for an LSTM)."""
    count = reference.num_layers * (2 if reference.bidirectional else 1)
    batch = (N,) if batched else ()
    h = torch.randn(count, *batch, getattr(reference, "proj_size", 0) or H, dtype=torch.double)
    if kind != "lstm":
        return h
    return h, torch.randn(count, *batch, H, dtype=torch.double)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_matches_torch_batched_unbatched_and_with_states(kind, batch_first, bidirectional):
    reference, unpacked = _pair(kind, num_layers=2, batch_first=batch_first,
                                bidirectional=bidirectional)
    x = torch.randn((N, T, IN) if batch_first else (T, N, IN), dtype=torch.double)
    assert_same_outputs(unpacked(x), reference(x))
    hx = _states(kind, reference)
    assert_same_outputs(unpacked(x, hx), reference(x, hx))
    single = torch.randn(T, IN, dtype=torch.double)
    assert_same_outputs(unpacked(single), reference(single))
    hx = _states(kind, reference, batched=False)
    assert_same_outputs(unpacked(single, hx), reference(single, hx))


@pytest.mark.parametrize("options", [
    {"proj_size": 2}, {"proj_size": 2, "bidirectional": True, "num_layers": 2},
    {"bias": False}, {"num_layers": 3, "bias": False, "bidirectional": True},
])
def test_lstm_options_match_torch(options):
    reference, unpacked = _pair("lstm", **options)
    x = torch.randn(T, N, IN, dtype=torch.double)
    assert_same_outputs(unpacked(x), reference(x))
    hx = _states("lstm", reference)
    assert_same_outputs(unpacked(x, hx), reference(x, hx))


def test_gradients_match_torch():
    reference, unpacked = _pair("lstm", num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(N, T, IN, dtype=torch.double, requires_grad=True)
    reference(x)[0].square().sum().backward()
    expected = x.grad.clone(), reference.weight_hh_l1_reverse.grad
    x.grad = None
    unpacked(x)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(unpacked.l1_reverse.hh.weight.grad, expected[1])


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dropout_between_layers_in_training_only(kind):
    # dropout=1 zeroes every input of the second layer, in torch and here alike
    reference, unpacked = _pair(kind, num_layers=2, dropout=1.0)
    x = torch.randn(T, N, IN, dtype=torch.double)
    assert_same_outputs(unpacked(x), reference(x))
    reference.eval(), unpacked.eval()
    assert_same_outputs(unpacked(x), reference(x))
    _, half = _pair(kind, num_layers=2, dropout=0.5)
    assert not torch.equal(half(x)[0], half.eval()(x)[0])  # in training it drops


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_packed_sequences_match_torch(kind, enforce_sorted, bidirectional):
    reference, unpacked = _pair(kind, num_layers=2, bidirectional=bidirectional,
                                batch_first=True)
    lengths = torch.tensor([5, 3, 1] if enforce_sorted else [2, 5, 4])
    x = torch.randn(3, T, IN, dtype=torch.double)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    got, expected = unpacked(packed), reference(packed)
    assert torch.equal(got[0].batch_sizes, expected[0].batch_sizes)
    assert_same_outputs(pad_packed_sequence(got[0], batch_first=True)[0],
                 pad_packed_sequence(expected[0], batch_first=True)[0])
    assert_same_outputs(got[1], expected[1])


@pytest.mark.parametrize("kind", KINDS)
def test_to_torch_round_trips(kind):
    reference, unpacked = _pair(kind, num_layers=2, bidirectional=True, batch_first=True)
    assert_converts_back(reference, unpacked)


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_weights_stay_frozen_both_ways(kind):
    torch.manual_seed(0)
    reference = KINDS[kind][0](IN, H).double()
    reference.weight_hh_l0.requires_grad_(False)
    unpacked = KINDS[kind][1].from_torch(reference)
    assert not unpacked.l0.hh.weight.requires_grad and unpacked.l0.ih.weight.requires_grad
    back = unpacked.to_torch()
    frozen = {name for name, p in back.named_parameters() if not p.requires_grad}
    assert frozen == {"weight_hh_l0"}


def test_to_dense_merges_kronecker_gates_and_keeps_svd_ones():
    reference, unpacked = _pair("lstm")
    unpacked.l0.hh = KroneckerLinear.from_dense(unpacked.l0.hh, a_shape=(4, 2), rank=1)
    x = torch.randn(T, N, IN, dtype=torch.double)
    dense = unpacked.to_dense()
    assert type(dense) is nn.LSTM
    assert_same_outputs(dense(x), unpacked(x))
    unpacked.l0.ih = nn.Sequential(nn.Linear(IN, 2), nn.Linear(2, 4 * H)).double()
    assert unpacked.to_dense() is unpacked
    with pytest.raises(TypeError, match="dense form.*Sequential"):
        unpacked.to_torch()


def test_names_follow_torch_parameters():
    _, unpacked = _pair("lstm", num_layers=2, bidirectional=True, proj_size=2)
    names = {n for n, _ in unpacked.named_parameters()}
    assert {"l0.ih.weight", "l0.hh.bias", "l1_reverse.hr.weight"} <= names
    assert "l0.hr.bias" not in names
    assert unpacked.l0.ih.weight.shape == (4 * H, IN)
    assert unpacked.l1.ih.weight.shape == (4 * H, 2 * 2)  # both directions' projections


def test_planning_unpacks_recurrent_layers_on_a_copy():
    model = nn.Sequential(nn.LSTM(IN, H), nn.GRU(H, H))
    planned = attention.with_unpacked_layers(model)
    assert isinstance(model[0], nn.LSTM) and isinstance(model[1], nn.GRU)  # unchanged
    assert isinstance(planned[0], UnpackedLSTM) and isinstance(planned[1], UnpackedGRU)
    assert set(attention.unpacked(model, ["1"])) == {"1"}
    with pytest.raises(TypeError, match="'0' is a Linear, not one of MultiheadAttention"):
        attention.unpacked(nn.Sequential(nn.Linear(1, 1), nn.LSTM(IN, H)), ["1", "0"])


def test_a_model_holding_one_fx_traces_and_refuses_script():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = UnpackedLSTM(IN, H, batch_first=True)
            self.head = nn.Linear(H, 2)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out)

    model = Tagger()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(N, T, IN)
    torch.testing.assert_close(graph(x), model(x))
    assert any(node.op == "call_module" and node.target == "lstm" for node in graph.graph.nodes)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile UnpackedLSTM"):
        torch.jit.script(model)


def test_bad_inputs_raise_clear_errors():
    _, unpacked = _pair("lstm", num_layers=2)
    x = torch.randn(T, N, IN, dtype=torch.double)
    with pytest.raises(ValueError, match=r"input must have shape .*got \(5, 2, 7\)"):
        unpacked(torch.randn(T, N, 7, dtype=torch.double))
    with pytest.raises(ValueError, match="no time steps"):
        unpacked(x[:0])
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h_0, c_0\)"):
        unpacked(x, torch.zeros(2, N, H))
    with pytest.raises(ValueError, match=r"hx: c_0 must have shape \(2, 2, 4\), got \(1, 2, 4\)"):
        unpacked(x, (torch.zeros(2, N, H), torch.zeros(1, N, H)))
    with pytest.raises(TypeError, match="must be an LSTM, got GRU"):
        UnpackedLSTM.from_torch(nn.GRU(IN, H))
    with pytest.raises(ValueError, match="proj_size must be smaller"):
        UnpackedLSTM(IN, H, proj_size=H)
    with pytest.raises(ValueError, match="dropout must be a number in"):
        UnpackedGRU(IN, H, dropout=2)
    with pytest.raises(ValueError, match="nonlinearity must be"):
        UnpackedRNN(IN, H, nonlinearity="sigmoid")
