"""The tiny model the speed benchmark's tests time (imported by test_speed, test_peers)."""

import torch
from torch import nn

RATIO = 2.0
INPUT = (16, 8, 8)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()
