"""A tiny randomly initialised BERT for the tests that need ``transformers`` (skipped where it
is not installed): hidden 32, two layers, a vocabulary of 96 tokens."""

from __future__ import annotations

import pytest
import torch


def tiny_bert_config(**overrides):
    transformers = pytest.importorskip("transformers")
    settings = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    return transformers.BertConfig(**(settings | overrides))


def tiny_bert(**overrides):
    """A seeded ``BertModel`` in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertModel(tiny_bert_config(**overrides)).eval()


def token_batch(batch: int = 2, length: int = 12, vocab: int = 96):
    """``(input_ids, attention_mask)``: the positional inputs of a BertModel (ids from 1: 0 is
    the padding token)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    return ids, torch.ones_like(ids)
