"""Moving weights between modules: readable errors for state dicts saved from another
architecture, and parameter copies that keep ``requires_grad``.

A leaf module (imports nothing from gkpd): saved models, pretrained weights and training
checkpoints all check what they load with it, and the layers that convert to and from torch's
(attention, recurrent, GPT-2's ``Conv1D``) copy their weights with it.
"""

from __future__ import annotations

import torch

__all__ = ["check_state_dict_matches", "copy_parameter"]


def copy_parameter(target: torch.Tensor, source: torch.Tensor) -> None:
    """``source``'s values into the parameter ``target``, and its ``requires_grad`` (a frozen
    weight stays frozen in the module that takes its place); not recorded by autograd."""
    with torch.no_grad():
        target.copy_(source)
    target.requires_grad_(source.requires_grad)


def check_state_dict_matches(module: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Raise a readable error when ``state_dict`` was saved from another architecture."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if mismatched:
            details.append(f"shape mismatch {mismatched[:5]}")
        raise ValueError(
            f"{source} was saved from another architecture than {type(module).__name__}: "
            + "; ".join(details)
        )
