"""DistributedDataParallel set-up for runs started by ``torchrun`` (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler


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


class DistributedDraw(Sampler[int]):
    """Each rank's share of one random draw per epoch of as many items as ``draw`` (the
    loader's own sampler) yields alone, e.g. ``--train-subset``'s draw; the whole data set,
    shuffled, for a plain loader. Every rank draws the same items (seeded by ``seed`` and the
    epoch) and reads every ``world``-th of them, the last ones repeated so that every rank
    reads as many (as ``DistributedSampler`` does)."""

    def __init__(self, dataset, draw: Sampler, seed: int, *, rank: int | None = None,
                 world: int | None = None) -> None:
        self.dataset, self.draw, self.seed, self.epoch = dataset, draw, seed, 0
        self.rank = dist.get_rank() if rank is None else rank
        self.world = dist.get_world_size() if world is None else world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.draw) / self.world)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        items, count = len(self.dataset), len(self.draw)
        order = torch.randperm(items, generator=generator).tolist()
        while len(order) < count:  # a draw larger than the data set (with replacement)
            order += torch.randperm(items, generator=generator).tolist()
        order = order[:count]
        order += order[: len(self) * self.world - count]
        return iter(order[self.rank::self.world])


def distributed_loader(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader, each rank reading its own share of the same draw per epoch
    (:class:`DistributedDraw`)."""
    sampler = DistributedDraw(loader.dataset, loader.sampler, seed)
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
