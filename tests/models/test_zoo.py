"""The model zoo: registry behaviour, shapes, known parameter counts, I3D inflation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gkpd.models import canonical_name, create, list_models
from gkpd.models.i3d import i3d_from_resnet50, inflate_from_2d

IMAGE = (3, 32, 32)
CLIP = (3, 2, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(name: str, **kwargs) -> int:
    with torch.device("meta"):  # no memory, no initialisation cost
        return n_params(create(name, **kwargs))


def is_video(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv3d) for m in model.modules())


def example(model: nn.Module, batch: int = 2, in_channels: int = 3) -> torch.Tensor:
    shape = CLIP if is_video(model) else IMAGE
    return torch.randn(batch, in_channels, *shape[1:])


def test_resnet32_has_046m_parameters():
    assert count("resnet32", num_classes=10) == 464_154


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {}, 11_689_512),
        ("resnet34", {}, 21_797_672),
        ("resnet50", {}, 25_557_032),
        ("se_resnet50", {}, 28_088_024),
        ("mobilenetv2", {}, 3_504_872),
        ("resnet18", {"stem": "cifar", "num_classes": 10}, 11_173_962),
    ],
)
def test_known_parameter_counts(name, kwargs, expected):
    assert count(name, **kwargs) == expected


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_gives_logits(name):
    torch.manual_seed(0)
    model = create(name, num_classes=7)
    x = example(model)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "se_resnet50", "mobilenetv2"])
def test_in_channels(name):
    model = create(name, num_classes=4, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_i3d_in_channels():
    model = create("i3d_resnet50", num_classes=4, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 2, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "hw"),
    [
        ("resnet18", {"stem": "imagenet"}, 1),
        ("resnet18", {"stem": "cifar"}, 4),
        ("mobilenetv2", {"stem": "imagenet"}, 1),
        ("mobilenetv2", {"stem": "cifar"}, 4),
    ],
)
def test_stems_set_the_output_stride(name, kwargs, hw):
    model = create(name, num_classes=3, **kwargs).eval()
    with torch.no_grad():  # both models expose the feature map before pooling
        assert model.features(torch.randn(1, 3, 32, 32)).shape[-2:] == (hw, hw)


def test_mobilenetv2_width_mult():
    assert (
        count("mobilenetv2", width_mult=0.5)
        < count("mobilenetv2")
        < count("mobilenetv2", width_mult=1.4)
    )


def test_se_resnet50_reuses_the_resnet_bottleneck():
    from gkpd.models.resnet import Bottleneck

    model = create("se_resnet50", num_classes=2)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16 and all(hasattr(b, "se") for b in blocks)
    assert blocks[0].se.fc1.out_features == 256 // 16


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [
        ("resnet18", {"stem": "tiny"}, "stem"),
        ("mobilenetv2", {"stem": "tiny"}, "stem"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult"),
        ("i3d_resnet50", {"inflate": "all"}, "inflate"),
        ("i3d_resnet50", {"time_kernel": 2}, "time_kernel"),
        ("i3d_resnet50", {"temporal_padding": "circular"}, "temporal_padding"),
    ],
)
def test_bad_options_are_named(name, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        create(name, **kwargs)


def test_unknown_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="resnet51"):
        create("resnet51")


@pytest.mark.parametrize(
    "alias, name",
    [
        ("mobilenet_v2", "mobilenetv2"),  # torchvision
        ("mobilenetv2_100", "mobilenetv2"),  # timm
        ("MobileNet-V2", "mobilenetv2"),
        ("seresnet50", "se_resnet50"),  # timm
        ("i3d-resnet50", "i3d_resnet50"),
        ("ResNet18", "resnet18"),
    ],
)
def test_torchvision_and_timm_names_build_the_zoo_model(alias, name):
    assert canonical_name(alias) == name
    assert alias not in list_models() or alias == name
    torch.manual_seed(0)
    built = create(alias, num_classes=7)
    torch.manual_seed(0)
    expected = create(name, num_classes=7)
    assert type(built) is type(expected)
    state, reference = built.state_dict(), expected.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_a_wrong_name_suggests_close_ones():
    with pytest.raises(ValueError, match=r"did you mean mobilenetv2\?") as info:
        canonical_name("mobilenet_v3")
    assert "known: i3d_resnet50, mobilenetv2, resnet110" in str(info.value)
    with pytest.raises(ValueError, match=r"did you mean se_resnet50, "):
        create("se_resnet51")
    with pytest.raises(ValueError) as info:
        create("vgg16")
    assert "did you mean" not in str(info.value)
    with pytest.raises(TypeError, match="must be a str"):
        create(None)


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=generator, dtype=torch.float64) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=generator, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=generator, dtype=torch.float64) * 0.1)


@pytest.mark.parametrize(
    ("frames", "kwargs"),
    [
        # time is never strided: the replicate padding of every t×3×3 kernel is exercised
        (3, {"inflate": "3x3", "stem_time_stride": 1, "temporal_pool": False}),
        (4, {"inflate": "alternate"}),
    ],
)
def test_i3d_inflation_reproduces_the_2d_model_on_a_boring_clip(frames, kwargs):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model2d = create("resnet50", num_classes=5).double().eval()
    randomize_batchnorm(model2d, generator)
    model3d = i3d_from_resnet50(model2d, time_kernel=3, **kwargs)
    assert not model3d.training and model3d.conv1.weight.dtype == torch.float64
    assert model3d.conv1.weight.shape[2] == 5
    frame = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    clip = frame.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()
    with torch.no_grad():
        expected = model2d(frame)
        got = model3d(clip)
    assert expected.abs().max() > 1e-3  # the comparison is not between two zeros
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_inflate_divides_the_repeated_kernel_by_its_length():
    model2d = create("resnet50", num_classes=3)
    model3d = create("i3d_resnet50", num_classes=3, time_kernel=3)
    inflate_from_2d(model3d, model2d)
    w2, w3 = model2d.layer1[0].conv2.weight, model3d.layer1[0].conv2.weight
    assert w3.shape == (64, 64, 3, 3, 3)
    torch.testing.assert_close(w3.sum(dim=2), w2)
    torch.testing.assert_close(w3[:, :, 0], w2 / 3)


def test_inflation_rejects_a_mismatched_2d_model():
    model3d = create("i3d_resnet50", num_classes=3)
    with pytest.raises(ValueError, match="layers"):
        inflate_from_2d(model3d, create("resnet18", num_classes=3))
    with pytest.raises(ValueError, match="stem"):
        i3d_from_resnet50(create("resnet50", num_classes=3, stem="cifar"))
    with pytest.raises(ValueError, match="conv1"):
        inflate_from_2d(model3d, create("resnet50", num_classes=3, in_channels=1))
