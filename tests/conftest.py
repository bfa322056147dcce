"""Fixtures shared by the tests."""

import pytest
import torch

import gkpd


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a test module: these models are tiny per call, and extra
    threads only fight other work on the machine. Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``. Module-scoped, so that hypothesis
    tests (which refuse function-scoped fixtures) share it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def resnet32():
    """A resnet32 for 1-channel 28x28 inputs, seeded, in eval mode."""
    torch.manual_seed(0)
    return gkpd.models.create("resnet32", num_classes=10, in_channels=1).eval()
