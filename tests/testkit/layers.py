"""Layers and oracles shared by the tests of the layer methods (svd, tucker, cp,
gkpd_tucker): plan entries made by hand, conv cases of every geometry, the dense layer with a
composed weight, and a small CNN with layers some methods refuse."""

import copy

import torch
from torch import nn

from gkpd.apply import apply_
from gkpd.counting import count_model
from gkpd.plan.schema import LayerPlan


def make_entry(module, method, settings):
    return LayerPlan(
        name="layer",
        module_type=type(module).__name__,
        weight_shape=tuple(module.weight.shape),
        input_shape=(1,),
        dense_params=0,
        dense_macs=0,
        method=method,
        settings=settings,
    )


def dense_layer(kind, *args, **kwargs):
    torch.manual_seed(len(args) + 7 * len(kwargs))
    return kind(*args, **kwargs, dtype=torch.float64)


def with_weight(dense, weight):
    oracle = copy.deepcopy(dense)
    with torch.no_grad():
        oracle.weight.copy_(weight)
    return oracle


def layer_input(dense):
    torch.manual_seed(1)
    if isinstance(dense, nn.Linear):
        return torch.randn(2, 3, dense.in_features, dtype=torch.float64)
    n = len(dense.kernel_size)
    return torch.randn(2, dense.in_channels, *([9, 8, 7][:n]), dtype=torch.float64)


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


CONVS = {
    "2d stride pad": lambda: dense_layer(nn.Conv2d, 6, 8, 3, stride=2, padding=1),
    "2d mixed reflect": lambda: dense_layer(
        nn.Conv2d,
        6,
        8,
        (3, 2),
        stride=(1, 2),
        padding=(2, 1),
        dilation=(2, 1),
        padding_mode="reflect",
        bias=False,
    ),
    "2d 1x3 circular": lambda: dense_layer(
        nn.Conv2d, 6, 8, (1, 3), stride=2, padding=(0, 1), padding_mode="circular"
    ),
    "2d 1x1 strided": lambda: dense_layer(nn.Conv2d, 8, 6, 1, stride=2),
    "1d same replicate": lambda: dense_layer(
        nn.Conv1d, 4, 6, 4, padding="same", dilation=2, padding_mode="replicate"
    ),
    "3d": lambda: dense_layer(nn.Conv3d, 4, 6, 3, stride=(1, 2, 1), padding=1),
}


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, (3, 1), padding=(1, 0), padding_mode="reflect")
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(torch.relu(self.stem(x)))))
        x = self.grouped(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


EXAMPLE = torch.randn(1, 3, 12, 12)


def apply_and_count(model, plan, example=EXAMPLE):
    """A compressed copy of ``model`` by ``plan``, checked to count the parameters and MACs
    that the plan says."""
    assert plan.compressed_layers
    compressed = apply_(copy.deepcopy(model), plan)
    counted = count_model(compressed, example)
    assert counted.total_params == plan.params
    assert counted.total_macs == plan.macs
    return compressed


def strided_cnn() -> nn.Module:
    """Three 3x3 convolutions (the last strided) and a linear head, for 3x8x8 inputs: what
    the latency and layout tests plan, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )
