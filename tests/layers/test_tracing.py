"""Compressed models under torch's tracers: torch.fx records each gkpd layer as one call (as
it records torch's own layers), torch.jit.trace works, torch.jit.script says what to use."""

import copy

import pytest
import torch
from torch import nn

import gkpd
from gkpd.layers.attention import UnpackedMultiheadAttention
from gkpd.models.resnet import BasicBlock

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def compressed_resnet():
    """A small ResNet (a stem, two basic blocks, one with a projection shortcut), at 2x."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), BasicBlock(32, 32),
        BasicBlock(32, 64, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 32),
    ).eval()
    return gkpd.compress(model, torch.randn(1, 3, 8, 8), ratio=2)


def test_fx_traces_a_compressed_resnet(compressed_resnet):
    model, plan = compressed_resnet
    graph = torch.fx.symbolic_trace(model)
    called = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert {e.name for e in plan.compressed_layers} <= called
    x = torch.randn(3, 3, 8, 8)  # another batch size than the plan's
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x))
        model.train(), graph.train()
        torch.testing.assert_close(graph(x), model(x))
    model.eval()


def test_fx_traces_compressed_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True), 1,
        enable_nested_tensor=False,
    ))
    x = torch.randn(2, 5, 32)
    compressed, _ = gkpd.compress(model.eval(), x, ratio=2)
    graph = torch.fx.symbolic_trace(compressed)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), compressed(x))
    with pytest.raises(TypeError, match="trace a module that holds it"):
        torch.fx.symbolic_trace(compressed[0].layers[0].linear1)


def test_jit_trace_works_and_jit_script_says_what_to_use(compressed_resnet):
    model, _ = compressed_resnet
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), model(x))
    contiguous = gkpd.layout.run_in_layout(copy.deepcopy(model), "contiguous")
    with pytest.raises(TypeError, match="torch.jit.script cannot compile KroneckerConv2d.*"
                       "torch.jit.trace"):
        torch.jit.script(contiguous)
    with pytest.raises(TypeError, match="UnpackedMultiheadAttention"):
        torch.jit.script(UnpackedMultiheadAttention(8, 2))


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_jit_script_compiles_a_model_of_plain_stages(method):
    """A low-rank or Tucker-2 layer is plain convolutions in a row: it scripts (its read-only
    ``weight`` property is left out of the compiled module); the layout hooks refuse."""
    if method == "tucker":
        pytest.importorskip("tensorly")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(2, 16, 8, 8)
    small, _ = gkpd.compress(model, x, ratio=2.0, method=method, tolerance=0.2,
                             layout="channels_last")
    with pytest.raises(TypeError, match="cannot compile Sequential: it runs in channels_last"
                       ".*run_in_layout\\(model, 'contiguous'\\)"):
        torch.jit.script(small)
    gkpd.layout.run_in_layout(small, "contiguous")
    scripted = torch.jit.script(small)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), small(x))
        torch.testing.assert_close(scripted(x), model(x), rtol=0.5, atol=0.5)  # compressed
