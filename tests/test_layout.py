"""gkpd.layout: a model run in channels_last converts its inputs and gives outputs back in the
caller's layout."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import gkpd
from gkpd.layout import has_strides_of, in_memory_format, layout_of, run_in_layout, to_layout

CL = torch.channels_last


class _TwoHeads(nn.Module):
    """Keyword input, a tuple output: a feature map and a vector."""

    def __init__(self, conv=nn.Conv2d):
        super().__init__()
        self.conv = conv(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x, *, scale=1.0):
        y = self.conv(x) * scale
        return y, self.head(y.mean(dim=tuple(range(2, y.dim()))))


def _model(conv=nn.Conv2d):
    torch.manual_seed(0)
    return _TwoHeads(conv).eval()


def test_channels_last_model_takes_and_gives_nchw():
    reference = _model()
    model = run_in_layout(_model(), "channels_last")
    assert layout_of(model) == "channels_last" and layout_of(reference) == "contiguous"
    assert model.conv.weight.is_contiguous(memory_format=CL)
    x = torch.randn(2, 3, 6, 6)
    seen = {}
    model.conv.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    with torch.no_grad():
        expected = reference(x, scale=2.0)
        maps, vector = model(x, scale=2.0)
    assert seen["x"].is_contiguous(memory_format=CL)  # the layers ran in channels_last
    assert maps.is_contiguous()  # the caller passed NCHW: NCHW comes back
    torch.testing.assert_close((maps, vector), expected)
    with torch.no_grad():  # a channels_last caller gets channels_last back
        maps, _ = model(x.to(memory_format=CL), scale=2.0)
    assert maps.is_contiguous(memory_format=CL) and not maps.is_contiguous()
    torch.testing.assert_close(maps, expected[0])


class _Flattens(nn.Module):
    """Outputs views of a feature map: flattened (channels innermost in channels_last), and
    transposed to tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y.flatten(2), y.flatten(2).transpose(1, 2)


def test_views_of_channels_last_maps_come_back_as_the_contiguous_model_gives_them():
    torch.manual_seed(0)
    reference = _Flattens().eval()
    model = run_in_layout(copy.deepcopy(reference), "channels_last")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    torch.testing.assert_close(got, expected)
    assert expected[0].is_contiguous() and got[0].is_contiguous()
    got[0].view(2, 8, 5, 5)  # as the caller could before
    assert got[1].is_contiguous()  # the tokens: contiguous in channels_last, left so


def test_a_one_channel_stem_runs_in_channels_last_too():
    """A 1-channel input and stem weight are contiguous in both layouts; unless they are
    restrided, torch runs the stem, and so every layer after it, in NCHW."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)).eval()
    model = run_in_layout(copy.deepcopy(reference), "channels_last")
    seen = {}
    model[1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.randn(2, 1, 9, 9)
    with torch.no_grad():
        y = model(x)
    assert not seen["x"].is_contiguous() and seen["x"].is_contiguous(memory_format=CL)
    assert y.is_contiguous()
    torch.testing.assert_close(y, reference(x))


def test_5d_models_run_in_channels_last_3d():
    model = run_in_layout(_model(nn.Conv3d), "channels_last")
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 3, 4, 5, 6)
    maps, _ = model(x)
    assert maps.is_contiguous()
    torch.testing.assert_close(maps, _model(nn.Conv3d)(x)[0])


def test_layout_is_set_once_undone_and_travels_with_copies():
    model = run_in_layout(run_in_layout(_model(), "channels_last"), "channels_last")
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1
    x = torch.randn(1, 3, 5, 5)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert layout_of(other) == "channels_last"
        assert other.conv.weight.is_contiguous(memory_format=CL)
        torch.testing.assert_close(other(x), model(x))
    run_in_layout(model, "contiguous")
    assert layout_of(model) == "contiguous" and model.conv.weight.is_contiguous()
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not model._forward_hooks_always_called and not model._forward_hooks_with_kwargs
    with pytest.raises(ValueError, match="layout must be one of"):
        run_in_layout(model, "nhwc")


def test_a_failed_call_leaves_nothing_behind():
    model = run_in_layout(_model(), "channels_last")
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 5, 4, 4))  # 5 channels for a 3-channel conv
    hooks = next(iter(model._forward_pre_hooks.values())).__self__
    assert hooks._callers == []
    assert model(torch.randn(1, 3, 4, 4))[0].is_contiguous()


def test_kronecker_layers_run_in_channels_last_and_train():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1))
    model = copy.deepcopy(dense)
    model[3] = gkpd.KroneckerConv2d.from_dense(dense[3], a_shape=(2, 1, 3, 3))  # exact
    model[3].path = "b_first_channels"
    run_in_layout(model, "channels_last")
    x = torch.randn(2, 4, 6, 6)
    model.eval()
    dense.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=1e-4, atol=1e-5)
    model.train()
    model(x).square().sum().backward()
    assert model[3].a.grad is not None and model[0].weight.grad is not None


def test_to_layout_converts_4d_and_5d_tensors_in_containers_only():
    image, volume, vector = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3, 3), torch.randn(4)
    converted = to_layout({"a": (image, [volume]), "b": vector, "c": "text"}, "channels_last")
    assert converted["a"][0].is_contiguous(memory_format=CL)
    assert converted["a"][1][0].is_contiguous(memory_format=torch.channels_last_3d)
    assert converted["b"] is vector and converted["c"] == "text"


def test_a_model_output_comes_back_of_its_own_type():
    """A dataclass-and-dict output (Hugging Face's ``ModelOutput``, of a convolutional model
    run in channels_last) keeps its type and attributes on the way back to NCHW."""
    from dataclasses import dataclass

    @dataclass
    class Output(dict):
        feature_map: torch.Tensor

        def __post_init__(self):
            self["feature_map"] = self.feature_map

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x):
            return Output(self.conv(x))

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(2, 3, 6, 6)
    want = model(x).feature_map
    out = run_in_layout(model, "channels_last")(x)
    assert type(out) is Output and out.feature_map.is_contiguous()
    torch.testing.assert_close(out.feature_map, want)


def test_has_strides_of_tells_apart_tensors_contiguous_in_both_layouts():
    nchw = torch.randn(2, 1, 5, 4)
    last = in_memory_format(nchw, torch.channels_last)
    assert nchw.is_contiguous(memory_format=torch.channels_last) and last.is_contiguous()
    assert has_strides_of(nchw, torch.contiguous_format)
    assert not has_strides_of(nchw, torch.channels_last)
    assert has_strides_of(last, torch.channels_last)
    assert not has_strides_of(last, torch.contiguous_format)
