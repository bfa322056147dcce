"""gkpd.train.finetune: the fine-tuning loader's draw."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from gkpd.train.features import same_name_pairs
from gkpd.train.finetune import EpochDraw, finetune


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


def _tiny_teacher() -> nn.Module:
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # noqa: E731
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), block(), block(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _loader() -> DataLoader:
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,)))
    return DataLoader(data, batch_size=8)


def _loss(student, teacher, **kwargs) -> float:
    history = finetune(student, teacher, _loader(), epochs=1, checkpoint_dir=None, resume=False,
                       progress=False, lr=1e-12, **kwargs)  # no step moves the weights
    return history[-1]["train_loss"]


def test_feature_layers_pair_modules_of_the_same_name():
    teacher = _tiny_teacher()
    assert same_name_pairs(copy.deepcopy(teacher), teacher, "re:[12]") == {"1": "1", "2": "2"}
    assert same_name_pairs(teacher, teacher, nn.ReLU) == {"1.1": "1.1", "2.1": "2.1"}
    with pytest.raises(ValueError, match="'blocks' names no module"):
        same_name_pairs(teacher, teacher, "blocks")
    with pytest.raises(ValueError, match="not a valid regex"):
        same_name_pairs(teacher, teacher, "re:(")


def test_feature_layers_add_the_distance_of_the_blocks_outputs():
    teacher = _tiny_teacher()
    twin = copy.deepcopy(teacher)
    # a student equal to its teacher: the feature term is zero
    assert _loss(twin, teacher, feature_layers="re:[12]") == pytest.approx(_loss(twin, teacher))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[1][0].weight.mul_(0.5)
    plain = _loss(copy.deepcopy(student), teacher)
    with_features = _loss(copy.deepcopy(student), teacher, feature_layers="re:[12]",
                          feature_weight=2.0)
    # the oracle: twice the mean squared error of the two blocks' outputs, batch by batch
    expected = 0.0
    with torch.no_grad():
        for x, _ in _loader():
            for i in (1, 2):
                expected += 2.0 * float(
                    nn.functional.mse_loss(student[: i + 1](x), teacher[: i + 1](x)))
    assert with_features - plain == pytest.approx(expected / len(_loader()), rel=1e-4)
    with pytest.raises(ValueError, match="pass teacher="):
        _loss(student, None, feature_layers="1")
    with pytest.raises(ValueError, match="feature_weight must be"):
        _loss(student, teacher, feature_layers="1", feature_weight=-1.0)
