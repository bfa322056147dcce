"""gkpd.report.summary and gkpd.timing.measure_latency on tiny models."""

import json

import pytest
import torch
from torch import nn

from gkpd.counting import count_model
from gkpd.layers import KroneckerConv2d, KroneckerLinear
from gkpd.report import Report, summary
from gkpd.timing import measure_latency


def tiny_model(kronecker: bool) -> nn.Module:
    torch.manual_seed(0)
    conv2 = nn.Conv2d(8, 8, 3, padding=1)
    fc = nn.Linear(8 * 4 * 4, 10)
    if kronecker:
        conv2 = KroneckerConv2d.from_dense(conv2, a_shape=(2, 2, 3, 1), rank=2)
        fc = KroneckerLinear.from_dense(fc, a_shape=(2, 8), rank=2)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        conv2,
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        fc,
    )


@pytest.mark.parametrize("kronecker", [False, True])
def test_summary_matches_count_model(kronecker):
    model = tiny_model(kronecker).train()
    x = torch.randn(2, 1, 8, 8)
    report = summary(model, x)
    counts = count_model(model, x)
    assert isinstance(report, Report)
    assert model.training  # mode restored
    assert [layer.name for layer in report.layers] == ["0", "3", "6"]
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.total_macs == counts.total_macs
    assert report.layer_params == sum(c.params for c in counts.layers)
    assert report.input_shape == (2, 1, 8, 8)
    assert report["3"].input_shape == (2, 8, 8, 8)
    assert len(report.kronecker_layers) == (2 if kronecker else 0)
    if kronecker:
        assert report["3"].type == "KroneckerConv2d"
        assert report["3"].path in ("a_first", "b_first")
        assert report["3"].params == 2 * (2 * 2 * 3 + 4 * 4 * 3) + 8
    else:
        assert report["3"].path is None
        assert report["3"].macs == 2 * 8 * 8 * 8 * 8 * 9


def test_report_table_and_json():
    model = tiny_model(True)
    report = summary(model, torch.randn(1, 1, 8, 8))
    text = str(report)
    for name in ("KroneckerConv2d", "KroneckerLinear", "Conv2d", f"{report.total_params:,}"):
        assert name in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["total_params"] == report.total_params
    assert data["total_macs"] == report.total_macs
    assert data["layers"][1]["input_shape"] == [1, 8, 8, 8]
    assert data["kronecker_layers"] == 2
    with pytest.raises(KeyError, match="nope"):
        report["nope"]


def test_summary_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        summary("resnet", torch.randn(1))


def test_measure_latency():
    model = tiny_model(False).train()
    result = measure_latency(model, torch.randn(3, 1, 8, 8), warmup=1, repeats=3, threads=1)
    assert model.training
    children = list(model.children())
    children[0].eval()  # mixed modes (a frozen part): each module comes back in its own
    measure_latency(model, torch.randn(1, 1, 8, 8), warmup=0, repeats=1)
    assert model.training and not children[0].training and children[1].training
    assert result["repeats"] == 3 and result["batch"] == 3 and result["threads"] == 1
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    with pytest.raises(ValueError, match="repeats"):
        measure_latency(model, torch.randn(1, 1, 8, 8), warmup=0, repeats=0)
    with pytest.raises(ValueError, match="threads"):
        measure_latency(model, torch.randn(1, 1, 8, 8), warmup=0, repeats=1, threads=0)


def test_summary_and_latency_of_a_model_called_with_keywords():
    from testkit.keyword_models import KeywordModel, token_batch

    torch.manual_seed(0)
    model, x = KeywordModel().eval(), token_batch(batch=2, length=7)
    report = summary(model, x)
    assert report.input_shape == (2, 7)  # the first tensor's, input_ids
    assert [layer.name for layer in report.layers] == ["up", "down", "head"]
    assert report.to_dict() == summary(model, (x["input_ids"], x["attention_mask"])).to_dict()
    result = measure_latency(model, x, warmup=1, repeats=2, threads=1)
    assert result["batch"] == 2 and result["repeats"] == 2 and result["median_ms"] > 0
