"""Run by the tests in a child process: ``fit`` on tiny synthetic data, then save the weights.

usage: python fit_script.py OUT_DIR EPOCHS [--resume] [--slow SECONDS_PER_BATCH]
Under torchrun each rank writes ``weights_rank{R}.pt``.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gkpd.train import fit


class Blobs(Dataset):
    """Two Gaussian blobs per class in 8-D; the index fixes the sample."""

    def __init__(self, count: int, slow: float = 0.0) -> None:
        generator = torch.Generator().manual_seed(1234)
        centers = torch.randn(4, 8, generator=generator) * 2
        self.labels = torch.arange(count) % 4
        self.points = centers[self.labels] + torch.randn(count, 8, generator=generator)
        self.slow = slow

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if self.slow:
            time.sleep(self.slow)
        # dropout-like augmentation drawn from the global RNG, so resume must restore it
        noise = 0.1 * torch.randn(8)
        return self.points[i] + noise, int(self.labels[i])


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("epochs", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    loader = DataLoader(Blobs(256, args.slow), batch_size=16, shuffle=True, drop_last=True)
    model = make_model()
    history = fit(
        model,
        loader,
        epochs=args.epochs,
        checkpoint_dir=args.out,
        resume=args.resume,
        device="cpu",
        progress=False,
        lr=0.05,
        seed=7,
    )
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {"weights": model.state_dict(), "history": history},
        os.path.join(args.out, f"weights_rank{rank}.pt"),
    )
    if dist.is_initialized():
        # a rank that exits with gloo's threads alive can abort ("terminate called ...")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
