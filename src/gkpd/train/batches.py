"""How :func:`gkpd.train.fit` and :func:`gkpd.train.evaluate` read a batch and call a model on it.

A batch, as a ``DataLoader`` yields it, is one of

* a mapping (a dict, a Hugging Face ``BatchEncoding``): the model's keyword inputs,
  ``model(**batch)``, and no targets (a loss function reads labels from the batch itself);
* ``(inputs, targets)``, a tuple or list of two (a ``TensorDataset`` of two tensors, a
  torchvision data set): ``inputs`` is a tensor, ``model(x)``; a tuple or list of positional
  inputs, ``model(*x)`` (the ``DataLoader`` collates tuples into lists); or a mapping of
  keyword inputs, ``model(**x)``;
* ``(inputs,)`` (a ``TensorDataset`` of one tensor) or a tensor: the model's input, no targets.

The call itself is :class:`gkpd.inputs.ModelCall`'s, the rules of example inputs, except that a
list is positional inputs here: the ``DataLoader`` collates tuples into lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from gkpd.inputs import ModelCall, map_tensors


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch; ``targets`` is ``None`` where the batch has none."""
    if isinstance(batch, Mapping) or isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, tuple | list):
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(
            f"a tuple batch is (inputs, targets) or (inputs,), got {len(batch)} elements; "
            "give a model of several inputs a dict of keyword inputs or ((a, b), targets)"
        )
    raise TypeError(
        "a batch must be a tensor, a tuple (inputs, targets) or a dict of keyword inputs, "
        f"got {type(batch).__name__}"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple or list, else
    ``model(inputs)``."""
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return ModelCall.of(inputs, "a batch's inputs").run(model)


def class_scores(output: Any) -> torch.Tensor:
    """The class scores of a classifier's output: the output itself, or its ``logits`` (a
    Hugging Face classifier's ``ModelOutput``, a dict)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(
        output, "logits", None
    )
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            "fit and evaluate need the model to return class scores: a tensor, or an output "
            f"with a 'logits' tensor; got {type(output).__name__} (or pass loss_fn=)"
        )
    return logits


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists and mappings) on ``device``;
    a mapping comes back as a dict."""
    return map_tensors(lambda t: t.to(device), value)


def batch_size(inputs: Any) -> int:
    """The leading dimension of the first tensor in ``inputs``."""
    if isinstance(inputs, torch.Tensor) and inputs.dim() > 0:
        return int(inputs.shape[0])
    items = inputs.values() if isinstance(inputs, Mapping) else (
        inputs if isinstance(inputs, tuple | list) else ()
    )
    for item in items:
        try:
            return batch_size(item)
        except ValueError:
            continue
    raise ValueError(f"the batch's inputs hold no batched tensor: {type(inputs).__name__}")


def progress_bar(loader: Any, progress: bool, description: str) -> Any:
    """``loader`` wrapped in a tqdm bar when ``progress`` (and tqdm is installed)."""
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return loader
        return tqdm(loader, desc=description, leave=False, dynamic_ncols=True)
    return loader
