"""A tiny sequence model called with keyword inputs, and padded token batches for it."""

import copy

import torch
from torch import nn
from torch.utils.data import Dataset


class TinyEncoder(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear, called as ``model(input_ids, attention_mask)``
    and returning ``{"last_hidden_state": ...}`` as a Hugging Face encoder does."""

    def __init__(self, vocab: int = 40, dim: int = 12, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.drop(torch.relu(self.mix(self.embed(input_ids))))
        hidden = self.out(hidden)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        return {"last_hidden_state": hidden}


class TokenBatches(Dataset):
    """``{"input_ids", "attention_mask"}`` samples of ``length`` tokens, the last ones
    padding (id 0, mask 0); the index fixes the sample."""

    def __init__(self, count: int, length: int = 6, vocab: int = 40, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (count, length), generator=generator)
        lengths = torch.randint(2, length + 1, (count,), generator=generator)
        self.mask = (torch.arange(length) < lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}


def perturbed_copy(model: nn.Module, scale: float, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with Gaussian noise of ``scale`` added to every parameter."""
    student = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return student
