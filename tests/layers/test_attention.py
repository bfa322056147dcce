"""UnpackedMultiheadAttention computes what nn.MultiheadAttention computes (the oracle), for
every option and mask; unfuse makes torch's transformer layers run their children."""

import copy

import pytest
import torch
from torch import nn

from gkpd.layers.attention import (
    UnfusedTransformerEncoderLayer,
    UnpackedMultiheadAttention,
    fuse_again,
    unfuse,
    with_unpacked_attention,
    with_unpacked_layers,
)

pytestmark = pytest.mark.usefixtures("one_thread")

E, HEADS, L, S, N = 8, 2, 5, 6, 3


def _inputs(batch_first, kdim=E, vdim=E, batched=True):
    torch.manual_seed(1)

    def shaped(length, dim):
        if not batched:
            return torch.randn(length, dim)
        return torch.randn(N, length, dim) if batch_first else torch.randn(length, N, dim)

    return shaped(L, E), shaped(S, kdim), shaped(S, vdim)


def _pair(**kwargs):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(E, HEADS, **kwargs)
    with torch.no_grad():  # nonzero biases, so that a bias mix-up shows
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return reference, UnpackedMultiheadAttention.from_torch(reference)


def _assert_same(reference, unpacked, *args, **kwargs):
    expected = reference(*args, **kwargs)
    got = unpacked(*args, **kwargs)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    if expected[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_torch_without_masks(batch_first, need_weights, average, mode):
    reference, unpacked = _pair(batch_first=batch_first)
    getattr(reference, mode)(), getattr(unpacked, mode)()
    q, k, v = _inputs(batch_first)
    with torch.no_grad():  # eval without grad: torch's own fused path, where it applies
        _assert_same(reference, unpacked, q, q, q, need_weights=need_weights,
                     average_attn_weights=average)
        _assert_same(reference, unpacked, q, k, v, need_weights=need_weights,
                     average_attn_weights=average)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["bool2d", "float3d", "padding", "both", "causal",
                                   "causal+padding"])
def test_matches_torch_with_masks(batch_first, need_weights, masks):
    reference, unpacked = _pair(batch_first=batch_first)
    q, k, v = _inputs(batch_first)
    torch.manual_seed(2)
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    kwargs = {"need_weights": need_weights}
    if masks in ("bool2d", "both"):
        kwargs["attn_mask"] = torch.rand(L, S) > 0.7
        kwargs["attn_mask"][:, 0] = False  # every query attends somewhere
    if masks == "float3d":
        kwargs["attn_mask"] = torch.randn(N * HEADS, L, S)
    if masks in ("padding", "both", "causal+padding"):
        kwargs["key_padding_mask"] = padding
    if masks.startswith("causal"):
        q = k = v = _inputs(batch_first)[0]
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L)
        kwargs["is_causal"] = True
        if "key_padding_mask" in kwargs:
            kwargs["key_padding_mask"] = padding[:, :L]
    _assert_same(reference, unpacked, q, k, v, **kwargs)


@pytest.mark.parametrize("options", [
    {"kdim": 4, "vdim": 6}, {"bias": False}, {"add_bias_kv": True}, {"add_zero_attn": True},
    {"add_bias_kv": True, "add_zero_attn": True},
])
@pytest.mark.parametrize("batched", [True, False])
def test_matches_torch_for_every_option(options, batched):
    reference, unpacked = _pair(batch_first=True, **options)
    q, k, v = _inputs(True, options.get("kdim", E), options.get("vdim", E), batched)
    padding = torch.zeros(*((N,) if batched else ()), S, dtype=torch.bool)
    padding[..., -1] = True
    for need_weights in (True, False):
        _assert_same(reference, unpacked, q, k, v, need_weights=need_weights)
        _assert_same(reference, unpacked, q, k, v, key_padding_mask=padding,
                     need_weights=need_weights)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_and_gradients_match_torch(need_weights):
    reference, unpacked = _pair(batch_first=True, dropout=0.3)
    q = _inputs(True)[0].requires_grad_()
    q2 = q.detach().clone().requires_grad_()
    torch.manual_seed(5)
    expected = reference(q, q, q, need_weights=need_weights)[0]
    torch.manual_seed(5)
    got = unpacked(q2, q2, q2, need_weights=need_weights)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    expected.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(q2.grad, q.grad, rtol=1e-4, atol=1e-6)
    packed = torch.cat([unpacked.q_proj.weight.grad, unpacked.k_proj.weight.grad,
                        unpacked.v_proj.weight.grad])
    torch.testing.assert_close(packed, reference.in_proj_weight.grad, rtol=1e-4, atol=1e-6)


def test_from_torch_keeps_the_parameter_count_and_mode():
    reference, unpacked = _pair(batch_first=True, add_bias_kv=True)
    assert sum(p.numel() for p in unpacked.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )
    assert UnpackedMultiheadAttention.from_torch(reference.eval()).training is False
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        UnpackedMultiheadAttention.from_torch(nn.Linear(2, 2))


def test_is_causal_needs_the_mask_as_torch_does():
    _, unpacked = _pair(batch_first=True)
    q = _inputs(True)[0]
    with pytest.raises(RuntimeError, match="attn_mask"):
        unpacked(q, q, q, is_causal=True)
    with pytest.raises(TypeError, match="attn_mask must be a bool or floating"):
        unpacked(q, q, q, attn_mask=torch.zeros(L, L, dtype=torch.long))


def _encoder(batch_first=True, norm_first=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=batch_first,
                                       norm_first=norm_first)
    nested = batch_first and not norm_first  # where torch can use it (else it warns)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_unpacked_encoder_matches_torch_in_train_and_eval(batch_first, norm_first):
    dense = _encoder(batch_first, norm_first)
    planned = with_unpacked_layers(dense)
    assert isinstance(dense.layers[0].self_attn, nn.MultiheadAttention)  # dense unchanged
    assert type(dense.layers[0]) is nn.TransformerEncoderLayer
    assert isinstance(planned.layers[0], UnfusedTransformerEncoderLayer)
    assert isinstance(planned.layers[1].self_attn, UnpackedMultiheadAttention)
    assert planned.layers[0].linear1 is dense.layers[0].linear1  # shared, not copied
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for mode in ("train", "eval"):
        dense.train(mode == "train"), planned.train(mode == "train")
        with torch.no_grad():  # eval: torch's fused path and nested tensors for the dense one
            for kwargs in ({}, {"src_key_padding_mask": padding}, {"mask": causal},
                           {"mask": causal, "is_causal": True}):
                expected = dense(x, **kwargs)
                got = planned(x, **kwargs)
                if "src_key_padding_mask" in kwargs and mode == "eval" and batch_first:
                    keep = ~padding  # nested tensors: torch gives 0 at padded positions
                    expected, got = expected[keep], got[keep]
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_unfuse_converts_only_layers_whose_children_were_replaced():
    encoder = _encoder()
    assert unfuse(encoder) is encoder
    assert type(encoder.layers[0]) is nn.TransformerEncoderLayer and encoder.use_nested_tensor
    encoder.layers[1].linear1 = nn.Sequential(nn.Linear(E, 4), nn.Linear(4, 16))
    unfuse(encoder)
    assert type(encoder.layers[0]) is nn.TransformerEncoderLayer
    assert isinstance(encoder.layers[1], UnfusedTransformerEncoderLayer)
    assert not encoder.use_nested_tensor
    with torch.no_grad():
        out = encoder.eval()(torch.randn(N, L, E), src_key_padding_mask=torch.zeros(N, L).bool())
    assert out.shape == (N, L, E)


@pytest.mark.parametrize("options", [
    {}, {"kdim": 4, "vdim": 6}, {"bias": False}, {"add_bias_kv": True, "add_zero_attn": True},
])
def test_to_dense_packs_the_projections_back_into_torchs_attention(options):
    reference, unpacked = _pair(batch_first=True, **options)
    unpacked.q_proj.weight.requires_grad_(False)
    dense = unpacked.to_dense()
    assert type(dense) is nn.MultiheadAttention and dense.batch_first
    assert sum(p.numel() for p in dense.parameters()) == sum(
        p.numel() for p in reference.parameters())
    assert dense.training == unpacked.training
    q, k, v = _inputs(True, options.get("kdim", E), options.get("vdim", E))
    _assert_same(reference, dense, q, k, v)
    frozen = dense.in_proj_weight if dense.in_proj_weight is not None else dense.q_proj_weight
    assert not frozen.requires_grad
    unpacked.v_proj = nn.Sequential(nn.Linear(options.get("vdim", E), 2), nn.Linear(2, E))
    assert unpacked.to_dense() is unpacked  # a projection without a dense form


def test_fuse_again_undoes_unfuse_once_the_children_are_torchs():
    encoder = _encoder()
    linear1 = encoder.layers[1].linear1
    encoder.layers[1].linear1 = nn.Sequential(nn.Linear(E, 4), nn.Linear(4, 16))
    unfuse(encoder)
    unfuse(encoder)  # a second unfuse keeps what the first recorded
    fuse_again(encoder)  # a child still replaced: nothing changes
    assert isinstance(encoder.layers[1], UnfusedTransformerEncoderLayer)
    assert not encoder.use_nested_tensor
    encoder.layers[1].linear1 = linear1
    assert fuse_again(encoder) is encoder
    assert type(encoder.layers[1]) is nn.TransformerEncoderLayer
    assert encoder.use_nested_tensor == _encoder().use_nested_tensor


def test_with_unpacked_layers_keeps_a_model_without_attention():
    model = nn.Sequential(nn.Linear(2, 2))
    assert with_unpacked_layers(model) is model
    copied = with_unpacked_layers(nn.Sequential(copy.deepcopy(_encoder())))
    assert isinstance(copied[0].layers[0].self_attn, UnpackedMultiheadAttention)
    with pytest.warns(DeprecationWarning, match="use with_unpacked_layers"):
        old = with_unpacked_attention(nn.Sequential(copy.deepcopy(_encoder())))
    assert isinstance(old[0].layers[0].self_attn, UnpackedMultiheadAttention)
