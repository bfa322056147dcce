"""A plan file written in today's format (version 1, GKPD's factor fields at the top of each
layer) keeps loading and applying."""

from __future__ import annotations

import torch
from torch import nn

import gkpd
from gkpd.plan.schema import CompressionPlan

# gkpd.plan(net(), torch.randn(1, 4, 6, 6), ratio=2, min_params=0, tolerance=0.2).to_json()
# at the commit that introduced this test, written compactly
VERSION_1 = """{"model_type": "Sequential", "method": "gkpd", "target_ratio": 2.0,
"strategy": "uniform", "objective": "error", "dense_params": 2352, "params": 1168,
"dense_macs": 6656, "macs": 6048, "layers": [
{"name": "0", "module_type": "Conv2d", "weight_shape": [8, 4, 3, 3], "input_shape": [1, 4, 6, 6],
 "dense_params": 288, "dense_macs": 4608, "method": "dense", "params": 288, "macs": 4608,
 "relative_error": 0.0, "a_shape": null, "b_shape": null, "rank": null, "order": null,
 "settings": {}, "reason": "first layer on 4 input channels"},
{"name": "3", "module_type": "Linear", "weight_shape": [16, 128], "input_shape": [1, 128],
 "dense_params": 2064, "dense_macs": 2048, "method": "gkpd", "params": 880, "macs": 1440,
 "relative_error": 0.6592379298334412, "a_shape": [16, 2], "b_shape": [1, 64], "rank": 9,
 "order": "b_first", "settings": {}, "reason": "compressed"}],
"options": {"min_params": 0, "allow_more_macs": false, "min_layer_ratio": 1.3333333333333333,
 "tolerance": 0.2, "exhaustive": false, "include": [], "exclude": []},
"version": 1, "achieved_ratio": 2.0136986301369864}"""


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16))


def test_a_version_1_plan_loads_and_applies(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(VERSION_1, encoding="utf-8")
    plan = CompressionPlan.load(path)
    entry = plan.layer("3")
    assert (entry.a_shape, entry.b_shape, entry.rank, entry.order) == ((16, 2), (1, 64), 9,
                                                                       "b_first")
    assert plan.layer("0").a_shape is None and not plan.layer("0").compressed
    model = gkpd.apply_(net(), plan)
    assert (model[3].a_shape, model[3].rank) == ((16, 2), 9)
    assert sum(p.numel() for p in model.parameters()) == plan.params
    assert model(torch.randn(2, 4, 6, 6)).shape == (2, 16)
