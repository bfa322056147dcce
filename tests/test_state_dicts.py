"""gkpd.state_dicts: readable errors for mismatched state dicts, and parameter copies."""

import torch
from torch import nn

from gkpd.state_dicts import copy_parameter


def test_copy_parameter_takes_the_values_and_requires_grad_outside_autograd():
    target = nn.Parameter(torch.zeros(2, 3))
    source = torch.arange(6.0).reshape(3, 2)
    copy_parameter(target, source.t())
    assert torch.equal(target, source.t()) and not target.requires_grad
    assert target.grad_fn is None  # a leaf still: the copy was not recorded
    trainable = nn.Parameter(torch.ones(2, 3))
    frozen = nn.Parameter(torch.zeros(2, 3), requires_grad=False)
    copy_parameter(frozen, trainable)
    assert frozen.requires_grad and frozen.grad_fn is None
