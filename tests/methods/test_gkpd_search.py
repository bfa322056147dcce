"""GKPD's candidate search: the value-independent split table is built once per layer shape,
splits of one spectrum share it, and the spectra match an SVD (their oracle)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from testkit.tiny_bert import tiny_bert, token_batch
from torch import nn

import gkpd
from gkpd.decompose import rearrange
from gkpd.methods.gkpd_search import (
    LayerShape,
    exact_energies,
    leading_energies,
    split_table,
    tail_errors,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _svd_errors(w: torch.Tensor, a: tuple[int, ...]) -> np.ndarray:
    s2 = torch.linalg.svdvals(rearrange(w.double(), a)).square().numpy()
    tails = np.append(np.cumsum(s2[::-1])[::-1], 0.0)
    return np.sqrt(tails[1:] / s2.sum())


@pytest.mark.parametrize(
    "shape,a", [((24, 36), (4, 6)), ((36, 24), (36, 1)), ((8, 6, 3, 3), (2, 3, 3, 1))]
)
def test_exact_tail_errors_match_an_svd(shape, a):
    torch.manual_seed(0)
    w = torch.randn(*shape)
    rank = min(math.prod(a), w.numel() // math.prod(a))
    errors, exact = tail_errors(w, a, rank, float(w.double().square().sum()))
    assert exact
    np.testing.assert_allclose(errors, _svd_errors(w, a)[:rank], atol=2e-4)
    assert errors[-1] == pytest.approx(0.0, abs=1e-3)  # full rank is exact


def test_randomized_energies_never_exceed_the_exact_ones():
    torch.manual_seed(0)
    # a decaying spectrum, as trained weights have, and a flat one
    u, _ = torch.linalg.qr(torch.randn(600, 300))
    v, _ = torch.linalg.qr(torch.randn(300, 300))
    for decay in (0.8, 1.0):
        m = (u * decay ** torch.arange(300.0)) @ v.T
        exact = exact_energies(m)[:20]
        estimate = leading_energies(m, 20)
        assert torch.all(estimate <= exact * (1 + 1e-4))
        if decay < 1:
            torch.testing.assert_close(estimate, exact, rtol=0.05, atol=0)
    assert torch.equal(leading_energies(m, 20), leading_energies(m, 20))  # deterministic


def test_large_matrices_with_few_ranks_take_the_randomized_estimate():
    torch.manual_seed(0)
    w = torch.randn(512, 512)
    total = float(w.double().square().sum())
    errors, exact = tail_errors(w, (512, 1), 8, total)
    assert not exact and len(errors) == 8
    assert np.all(errors >= _svd_errors(w, (512, 1))[:8] - 1e-6)  # never optimistic


def test_splits_of_one_spectrum_share_it():
    layer = nn.Linear(12, 20)
    shape = LayerShape.of(layer, (1, 12))
    table = {s.a: s for s in split_table(shape, 240, None)}
    # (20, 1) ⊗ (1, 12) and (1, 12) ⊗ (20, 1): M and its transpose
    assert table[(20, 1)].spectrum == table[(1, 12)].spectrum
    assert table[(4, 3)].spectrum == (4, 3)
    w = layer.weight.detach()
    total = float(w.double().square().sum())
    np.testing.assert_allclose(tail_errors(w, (20, 1), 12, total)[0],
                               tail_errors(w, (1, 12), 12, total)[0], atol=1e-6)


def test_the_split_table_is_built_once_per_layer_shape():
    split_table.cache_clear()
    plan = gkpd.plan(tiny_bert(), token_batch(), ratio=1.2, include=["re:encoder\\..*"])
    assert len(plan.compressed_layers) == 12
    info = split_table.cache_info()
    # three shapes: the attention projections (32×32), intermediate (64×32), output (32×64)
    assert info.misses == 3 and info.hits == 12 - 3


def test_a_plan_takes_the_exact_errors_of_its_tables(monkeypatch, resnet32):
    calls = []
    real = gkpd.methods.GKPD.exact_error
    monkeypatch.setattr(gkpd.methods.GKPD, "exact_error",
                        lambda self, *args, **kw: calls.append(1) or real(self, *args, **kw))
    plan = gkpd.plan(resnet32, torch.randn(1, 1, 28, 28), ratio=1.03, include="re:layer1\\..*")
    assert plan.compressed_layers and not calls  # small layers: every spectrum is exact
    compressed = gkpd.apply_(copy.deepcopy(resnet32), plan)
    for entry in plan.compressed_layers:
        dense = resnet32.get_submodule(entry.name).weight.detach()
        rebuilt = compressed.get_submodule(entry.name).reconstruct_weight().detach()
        measured = float((dense - rebuilt).norm() / dense.norm())
        assert measured == pytest.approx(entry.relative_error, rel=1e-3, abs=1e-5)
