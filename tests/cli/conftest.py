"""The CLI tests' shared fixtures: a fake data set, a teacher trained on it, and that
teacher compressed (trained and compressed once per session: they are read, never changed)."""

import pytest
import torch
from testkit.fake_data import write_fake_fashion_mnist

from gkpd.cli import main


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """A fake data set and a resnet20 trained on it for one epoch (the teacher)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli")
    data = write_fake_fashion_mnist(root / "data")
    teacher = root / "teacher"
    code = main(
        [
            "train",
            "resnet20",
            "--data",
            "fashion-mnist",
            "--data-dir",
            str(data),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(teacher),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    return root, data, teacher


@pytest.fixture(scope="session")
def compressed(workspace):
    root, _, teacher = workspace
    out = root / "compressed"
    assert main(["compress", str(teacher), "--ratio", "2", "--out", str(out), "--json"]) == 0
    return out
