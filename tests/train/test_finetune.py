"""gkpd.train.finetune: the fine-tuning loader's draw."""

import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from gkpd.train.finetune import EpochDraw


def test_epoch_draw_draws_as_a_random_sampler_of_its_size():
    data = TensorDataset(torch.arange(50))
    draw = EpochDraw(data, 20)
    torch.manual_seed(3)
    drawn = [list(draw), list(draw)]
    torch.manual_seed(3)
    reference = RandomSampler(data, num_samples=20)
    assert drawn == [list(reference), list(reference)]
    assert len(set(drawn[0])) == len(drawn[0]) == len(draw) == 20  # without replacement
    draw.samples = 7
    assert len(draw) == 7 and len(list(draw)) == 7


def test_epoch_draw_stops_when_told_and_so_ends_the_epoch():
    data = TensorDataset(torch.arange(50))
    draw = EpochDraw(data, 40)
    draw.stop = lambda drawn: drawn >= 13
    loader = DataLoader(data, batch_size=4, sampler=draw, drop_last=True)
    batches = list(loader)
    assert draw.drawn == 13 and len(batches) == 3  # the partial fourth batch is dropped
    torch.manual_seed(3)
    stopped = list(draw)
    torch.manual_seed(3)
    assert stopped == list(RandomSampler(data, num_samples=40))[:13]  # the same draws, cut
