"""Tiny models called the way Hugging Face models are: keyword inputs, and dict or dataclass
outputs (stand-ins for ``transformers`` models, which the tests do not need installed); and
one model of two positional inputs with a tuple output."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

VOCAB = 50


@dataclass
class TinyOutput:
    """What a Hugging Face ``ModelOutput`` holds: named tensors, some of them unset."""

    logits: Tensor
    hidden_states: Tensor
    attentions: Tensor | None = None


class KeywordModel(nn.Module):
    """``forward(input_ids, attention_mask=None)``: token embeddings, a feed-forward block
    (two linears), masked mean pooling and a classifier head. ``output`` is ``"dict"``,
    ``"ordered"`` (an ``OrderedDict``, as ``ModelOutput`` is) or ``"dataclass"``."""

    def __init__(self, output: str = "dict", width: int = 64, hidden: int = 128,
                 classes: int = 8) -> None:
        super().__init__()
        self.output = output
        self.embedding = nn.Embedding(VOCAB, width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None):
        hidden = self.embedding(input_ids)
        hidden = hidden + self.down(torch.relu(self.up(hidden)))
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        logits = self.head(pooled)
        if self.output == "dataclass":
            return TinyOutput(logits=logits, hidden_states=hidden)
        fields = {"logits": logits, "hidden_states": hidden}
        return OrderedDict(fields) if self.output == "ordered" else fields


class PairModel(nn.Module):
    """``forward(x, y)`` of two positional inputs; returns a tuple of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(32, 64)
        self.right = nn.Linear(16, 64)
        self.mix = nn.Linear(64, 48)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        joint = torch.relu(self.left(x) + self.right(y))
        return self.mix(joint), joint


def token_batch(batch: int = 2, length: int = 7, seed: int = 0) -> dict[str, Tensor]:
    """Keyword inputs as a tokenizer gives them: ``input_ids`` and a padding ``attention_mask``
    (the last sequence padded)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length // 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pair_batch(batch: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 32, generator=gen), torch.randn(batch, 16, generator=gen)


class TokenDataset(torch.utils.data.Dataset):
    """Samples of keyword inputs with a label, as a text data set gives them: a loader
    batches them into ``(dict of inputs, labels)``."""

    def __init__(self, inputs: dict[str, Tensor], labels: Tensor | None = None) -> None:
        self.inputs = inputs
        self.labels = torch.zeros(len(inputs["input_ids"]), dtype=torch.long) if labels is None \
            else labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.inputs.items()}, self.labels[i]
