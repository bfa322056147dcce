"""CifarResNet's ``widths`` keyword: the default is the paper's network, narrower ones work."""

import pytest
import torch

from gkpd import models


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_default_widths_unchanged():
    default = models.create("resnet32", num_classes=10, in_channels=1)
    explicit = models.create("resnet32", num_classes=10, in_channels=1, widths=(16, 32, 64))
    assert default.widths == (16, 32, 64)
    assert _params(default) == _params(explicit) == 463_866
    assert default.state_dict().keys() == explicit.state_dict().keys()


def test_narrower_network_runs_and_is_smaller():
    narrow = models.create("resnet20", num_classes=10, in_channels=1, widths=[5, 11, 23])
    assert narrow.widths == (5, 11, 23)
    assert narrow(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert _params(narrow) < _params(models.create("resnet20", in_channels=1)) / 5


@pytest.mark.parametrize("widths", [(16, 32), (0, 4, 8), (16, 8, 64), (1.5, 2, 4)])
def test_bad_widths(widths):
    with pytest.raises(ValueError, match="widths"):
        models.create("resnet20", widths=widths)
