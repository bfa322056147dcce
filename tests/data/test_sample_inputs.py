import pytest
import torch
from testkit.fake_data import write_fake_fashion_mnist

from gkpd.data import build_dataset, sample_inputs


def test_sample_inputs_is_a_fixed_unaugmented_draw(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "data")
    a = sample_inputs("fashion-mnist", 10, root)
    b = sample_inputs("fashion-mnist", 10, root)
    assert a.shape == (10, 1, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, sample_inputs("fashion-mnist", 10, root, seed=1))
    plain = build_dataset("fashion-mnist", "train", root, augment=False)
    every = torch.stack([plain[i][0] for i in range(len(plain))])
    # each drawn image is one of the split's, not augmented, and none twice
    matches = [(every == img).flatten(1).all(1).nonzero().flatten().tolist() for img in a]
    assert all(len(m) == 1 for m in matches)
    assert len({m[0] for m in matches}) == 10


def test_sample_inputs_refuses_bad_counts(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "data")
    with pytest.raises(ValueError, match="count must be a positive int"):
        sample_inputs("fashion-mnist", 0, root)
    with pytest.raises(ValueError, match="more than the 64 samples"):
        sample_inputs("fashion-mnist", 65, root)
