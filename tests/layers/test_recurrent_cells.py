"""UnpackedLSTMCell / UnpackedGRUCell / UnpackedRNNCell compute torch's cells' step (the
oracle: float64, every option, gradients), convert back, and refuse bad input clearly."""

import pytest
import torch
from testkit import assert_converts_back, assert_same_outputs
from torch import nn

from gkpd.layers import KroneckerLinear, attention
from gkpd.layers.recurrent_cells import (
    UnpackedGRUCell,
    UnpackedLSTMCell,
    UnpackedRNNCell,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IN, H, N = 3, 4, 2
KINDS = {"lstm": (nn.LSTMCell, UnpackedLSTMCell), "gru": (nn.GRUCell, UnpackedGRUCell),
         "rnn": (nn.RNNCell, UnpackedRNNCell)}


def _pair(kind, **options):
    torch.manual_seed(0)
    reference = KINDS[kind][0](IN, H, **options).double()
    return reference, KINDS[kind][1].from_torch(reference)


def _state(kind, batch=(N,)):
    h = torch.randn(*batch, H, dtype=torch.double)
    return (h, torch.randn(*batch, H, dtype=torch.double)) if kind == "lstm" else h


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_batched_unbatched_and_with_states(kind, bias):
    reference, unpacked = _pair(kind, bias=bias)
    x = torch.randn(N, IN, dtype=torch.double)
    assert_same_outputs(unpacked(x), reference(x))
    hx = _state(kind)
    assert_same_outputs(unpacked(x, hx), reference(x, hx))
    one, hx = torch.randn(IN, dtype=torch.double), _state(kind, batch=())
    assert_same_outputs(unpacked(one), reference(one))
    assert_same_outputs(unpacked(one, hx), reference(one, hx))


def test_relu_rnn_cell_and_a_loop_of_steps_match_torch():
    reference, unpacked = _pair("rnn", nonlinearity="relu")
    assert unpacked.nonlinearity == "relu"
    lstm, lstm_unpacked = _pair("lstm")
    xs = torch.randn(5, N, IN, dtype=torch.double)
    h, state, state_unpacked = None, None, None
    for x in xs:
        h = reference(x, h)
        state, state_unpacked = lstm(x, state), lstm_unpacked(x, state_unpacked)
    h_unpacked = None
    for x in xs:
        h_unpacked = unpacked(x, h_unpacked)
    assert_same_outputs(h_unpacked, h)
    assert_same_outputs(state_unpacked, state)


def test_gradients_match_torch():
    reference, unpacked = _pair("gru")
    x = torch.randn(N, IN, dtype=torch.double, requires_grad=True)
    hx = _state("gru")
    reference(x, hx).square().sum().backward()
    expected = x.grad.clone(), reference.weight_hh.grad
    x.grad = None
    unpacked(x, hx).square().sum().backward()
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(unpacked.hh.weight.grad, expected[1])


@pytest.mark.parametrize("kind", KINDS)
def test_to_torch_round_trips(kind):
    options = {"nonlinearity": "relu"} if kind == "rnn" else {"bias": False}
    reference, unpacked = _pair(kind, **options)
    assert_converts_back(reference, unpacked)


def test_to_dense_merges_kronecker_gates_and_keeps_svd_ones():
    reference, unpacked = _pair("lstm")
    unpacked.hh = KroneckerLinear.from_dense(unpacked.hh, a_shape=(4, 2), rank=1)
    x = torch.randn(N, IN, dtype=torch.double)
    dense = unpacked.to_dense()
    assert type(dense) is nn.LSTMCell
    assert_same_outputs(dense(x), unpacked(x))
    unpacked.ih = nn.Sequential(nn.Linear(IN, 2), nn.Linear(2, 4 * H)).double()
    assert unpacked.to_dense() is unpacked
    with pytest.raises(TypeError, match="dense form.*Sequential"):
        unpacked.to_torch()


def test_planning_unpacks_cells_on_a_copy():
    model = nn.Sequential(nn.LSTMCell(IN, H))
    planned = attention.with_unpacked_layers(model)
    assert isinstance(model[0], nn.LSTMCell) and isinstance(planned[0], UnpackedLSTMCell)
    assert {n for n, _ in planned.named_parameters()} == {
        "0.ih.weight", "0.ih.bias", "0.hh.weight", "0.hh.bias"}


def test_a_model_holding_one_fx_traces_and_refuses_script():
    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = UnpackedGRUCell(IN, H)
            self.head = nn.Linear(H, 2)

        def forward(self, x):
            return self.head(self.cell(x))

    model = Step()
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(N, IN)
    torch.testing.assert_close(graph(x), model(x))
    assert any(node.op == "call_module" and node.target == "cell" for node in graph.graph.nodes)
    with pytest.raises(TypeError, match="torch.jit.script cannot compile UnpackedGRUCell"):
        torch.jit.script(model)


def test_bad_inputs_raise_clear_errors():
    _, unpacked = _pair("lstm")
    x = torch.randn(N, IN, dtype=torch.double)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 3\) or \(3,\), got \(2, 7\)"):
        unpacked(torch.randn(N, 7, dtype=torch.double))
    with pytest.raises(TypeError, match="input must be a Tensor, got list"):
        unpacked([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match=r"hx must be a tuple \(h, c\)"):
        unpacked(x, torch.zeros(N, H))
    with pytest.raises(ValueError, match=r"hx: c must have shape \(2, 4\), got \(1, 4\)"):
        unpacked(x, (torch.zeros(N, H), torch.zeros(1, H)))
    with pytest.raises(ValueError, match=r"hx: hx must have shape \(4,\), got \(2, 4\)"):
        _pair("gru")[1](torch.randn(IN, dtype=torch.double), torch.zeros(N, H))
    with pytest.raises(TypeError, match="must be an LSTMCell, got GRUCell"):
        UnpackedLSTMCell.from_torch(nn.GRUCell(IN, H))
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        UnpackedGRUCell(IN, 0)
    with pytest.raises(ValueError, match="nonlinearity must be"):
        UnpackedRNNCell(IN, H, nonlinearity="sigmoid")
