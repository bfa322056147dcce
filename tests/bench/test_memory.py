"""peak_memory_mb: the growth of a fresh process's peak resident set over one forward pass."""

import pytest
import torch
from torch import nn

from gkpd.bench.memory import peak_memory_mb


def test_peak_memory_sees_a_large_activation():
    # an 8x8 input upsampled to 2048x2048 floats: 16 MB of activation
    model = nn.Sequential(nn.Upsample(scale_factor=256), nn.ReLU())
    peak = peak_memory_mb(model, torch.zeros(1, 1, 8, 8))
    assert peak == pytest.approx(32, abs=8)  # the upsampled tensor and the ReLU's output
