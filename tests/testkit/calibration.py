"""A small model and correlated images for the tests of data-aware planning."""

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """Plain and grouped convolutions and linears: every layer kind calibration whitens."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        self.fc = nn.Linear(32, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x)).mean((2, 3))
        return self.head(torch.relu(self.fc(x)))


def correlated_images(n: int = 96) -> torch.Tensor:
    """``(n, 3, 8, 8)`` images with correlated channels, so that whitening has something to
    find."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, 3, 8, 8, generator=g)
    return base + base[:, :1]
