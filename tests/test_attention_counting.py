"""Attention MACs: by hand for a tiny layer, against what torch executes (its flop counter),
the same for torch's attention and gkpd's unpacked one, and for scaled_dot_product_attention
wherever it is called."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gkpd.counting import count_model
from gkpd.layers.attention import UnpackedMultiheadAttention, with_unpacked_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def test_attention_macs_of_a_tiny_layer_by_hand():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)  # sequence first
    q, k, v = torch.randn(3, 2, 4), torch.randn(6, 2, 3), torch.randn(6, 2, 5)
    counts = count_model(mha, (q, k, v))
    # projections: q and out 2·3·4·4 each, k 2·6·3·4, v 2·6·5·4; QKᵀ and AV: 2·(2·3·6·4)
    assert counts.total_macs == 96 + 96 + 144 + 240 + 2 * 144
    assert [(c.name, c.kind, c.params) for c in counts.layers] == [
        ("", "MultiheadAttention", sum(p.numel() for p in mha.parameters()))
    ]
    unpacked = UnpackedMultiheadAttention.from_torch(mha)
    split = count_model(unpacked, (q, k, v))
    assert split.total_macs == counts.total_macs
    assert split[""].kind == "UnpackedMultiheadAttention" and split[""].macs == 2 * 144
    assert split["k_proj"].macs == 144


@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True, "add_zero_attn": True},
                                     {"kdim": 6, "vdim": 2}])
@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_macs_are_what_torch_executes(options, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options)

    def shaped(length, dim):
        return torch.randn(3, length, dim) if batch_first else torch.randn(length, 3, dim)

    args = (shaped(5, 8), shaped(7, options.get("kdim", 8)), shaped(7, options.get("vdim", 8)))
    for module in (mha, UnpackedMultiheadAttention.from_torch(mha)):
        # with its weights, attention runs as matmuls, which the flop counter sees (it does
        # not count the CPU kernel of scaled_dot_product_attention)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*args, need_weights=True)
        assert count_model(module, args).total_macs == counter.get_total_flops() // 2


def test_scaled_dot_product_attention_is_counted_where_it_is_called():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum()

    model = nn.Sequential(Attention())
    counts = count_model(model, torch.randn(2, 5, 8))
    assert counts["0"].kind == "scaled_dot_product_attention"
    assert counts["0"].macs == 2 * 2 * 5 * 5 * (4 + 4)  # (N, heads, L) rows · S · (E + Ev)
    assert counts.total_macs == counts["0.qkv"].macs + counts["0"].macs


def test_a_transformer_counts_the_same_dense_and_unpacked():
    torch.manual_seed(0)
    model = nn.Transformer(8, 2, 1, 1, 16, batch_first=True).eval()
    args = (torch.randn(2, 5, 8), torch.randn(2, 4, 8))
    dense = count_model(model, args)
    unpacked = count_model(with_unpacked_layers(model), args)
    assert dense.total_macs == unpacked.total_macs
    assert dense.total_params == unpacked.total_params
    kinds = {c.kind for c in unpacked.layers}
    assert kinds == {"Linear", "UnpackedMultiheadAttention"}
