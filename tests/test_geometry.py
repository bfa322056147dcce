"""gkpd.geometry: padding, output sizes, group splits and the stages' strides and padding."""

import pytest
import torch
from torch import nn

from gkpd import counting, geometry
from gkpd.geometry import (
    conv_output_shape,
    group_split,
    ntuple,
    padding_stage,
    resolve_padding,
    stage_strides,
)


def test_resolve_padding():
    assert resolve_padding("same", (4, 3), (1, 1), (1, 2)) == ((1, 2), (2, 2))
    assert resolve_padding("valid", (3, 3), (2, 2), (1, 1)) == ((0, 0), (0, 0))
    assert resolve_padding(2, (3, 3), (2, 2), (1, 1)) == ((2, 2), (2, 2))
    with pytest.raises(ValueError, match="stride 1"):
        resolve_padding("same", (3,), (2,), (1,))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (3, 2, 2)])
def test_conv_output_shape_is_torchs(stride, padding, dilation):
    conv = nn.Conv2d(2, 3, (3, 2), stride=stride, padding=padding, dilation=dilation)
    x = torch.zeros(1, 2, 11, 9)
    pads = resolve_padding(padding, (3, 2), (stride,) * 2, (dilation,) * 2)
    out = conv_output_shape((11, 9), (3, 2), (stride,) * 2, pads, (dilation,) * 2)
    assert out == tuple(conv(x).shape[2:])
    with pytest.raises(ValueError, match="too small"):
        conv_output_shape((1,), (3,), (1,), ((0, 0),), (1,))


def test_group_split():
    assert group_split(2, (4, 1), (8, 1)) == (2, 1)  # groups divide F1
    assert group_split(32, (4, 1), (8, 1)) == (4, 8)  # depthwise
    with pytest.raises(ValueError, match="incompatible"):
        group_split(8, (3, 1), (8, 1))


def test_stage_strides_and_padding_stage():
    # the second stage (A for b_first) is 1x1 on both axes: the stride moves to the first
    assert stage_strides("b_first", (1, 1), (3, 3), (2, 2)) == ((2, 2), (1, 1))
    assert stage_strides("a_first", (1, 1), (3, 3), (2, 2)) == ((1, 1), (2, 2))
    pads = ((1, 1), (1, 1))
    assert padding_stage("a_first", (1, 1), (3, 3), (1, 1), pads) == "second"
    assert padding_stage("b_first", (1, 1), (3, 3), (1, 1), pads) == "first"
    assert padding_stage("b_first", (1, 1), (3, 3), (1, 1), pads, "reflect") == "input"
    assert ntuple("stride", 2, 3) == (2, 2, 2)


def test_counting_reexports_the_geometry():
    for name in geometry.__all__:
        assert getattr(counting, name) is getattr(geometry, name)
