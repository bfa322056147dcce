"""DistributedDataParallel set-up for runs started by ``torchrun`` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def ensure_process_group(device: torch.device) -> bool:
    """Join the process group that torchrun describes; True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched_by_torchrun():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def distributed_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader, each rank reading its own shard, shuffled by epoch."""
    sampler = DistributedSampler(
        loader.dataset, shuffle=True, seed=seed, drop_last=loader.drop_last
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
    )


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
