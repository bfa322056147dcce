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
    stage_paddings,
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


def test_stage_strides_and_stage_paddings():
    # the second stage (A for b_first) is 1x1 on both axes: the stride moves to the first
    assert stage_strides("b_first", (1, 1), (3, 3), (2, 2)) == ((2, 2), (1, 1))
    assert stage_strides("a_first", (1, 1), (3, 3), (2, 2)) == ((1, 1), (2, 2))
    pads = ((1, 1), (1, 1))
    assert stage_paddings("a_first", (1, 1), (3, 3), (1, 1), pads) == ((0, 0), (1, 1))
    assert stage_paddings("b_first", (1, 1), (3, 3), (1, 1), pads) == ((1, 1), (0, 0))
    assert stage_paddings("b_first", (1, 1), (3, 3), (1, 1), pads, "reflect") is None
    assert ntuple("stride", 2, 3) == (2, 2, 2)


def test_stage_paddings_pads_each_axis_where_its_kernel_is():
    pads = ((1, 1), (1, 1))
    # A (.., 3, 1) first: H in the first stage, W (A's extent 1) in the second
    assert stage_paddings("a_first", (3, 1), (1, 3), (1, 1), pads) == ((1, 0), (0, 1))
    assert stage_paddings("b_first", (3, 1), (1, 3), (1, 1), pads) == ((0, 1), (1, 0))
    # a stride on the first stage's axis keeps that axis's padding there
    assert stage_paddings("a_first", (1, 3), (1, 1), (2, 1), pads) == ((1, 1), (0, 0))
    # no padding at all, in any mode
    assert stage_paddings("a_first", (3, 1), (1, 3), (1, 1), ((0, 0), (0, 0)),
                          "reflect") == ((0, 0), (0, 0))
    # asymmetric ("same" with an even kernel) runs with F.pad before both stages
    assert stage_paddings("a_first", (2, 1), (1, 2), (1, 1), ((0, 1), (0, 1))) is None


def test_padding_stage_is_deprecated_and_keeps_its_answers():
    pads = ((1, 1), (1, 1))
    with pytest.warns(DeprecationWarning, match="stage_paddings"):
        assert padding_stage("a_first", (1, 1), (3, 3), (1, 1), pads) == "second"
    with pytest.warns(DeprecationWarning):
        assert padding_stage("b_first", (1, 1), (3, 3), (1, 1), pads) == "first"
    with pytest.warns(DeprecationWarning):
        assert padding_stage("b_first", (1, 1), (3, 3), (1, 1), pads, "reflect") == "input"


def test_counting_reexports_the_geometry():
    for name in geometry.__all__:
        assert getattr(counting, name) is getattr(geometry, name)
