"""Plan format version 2 keeps GKPD's factor shapes, rank and path in the layer settings;
version 1 files (GKPD's fields at the top of each layer, the path as ``order``) keep loading,
applying and saving.

The files under ``fixtures/`` were written by gkpd at version 1 (``gkpd.plan(net(), X,
ratio=2, min_params=0, tolerance=0.2)``, with ``objective=LatencyObjective(batch=2)`` or
``method="svd"``); ``plan_v1_latency.json`` was then edited by hand to run layer "5" in the
stage order ``b_first``, and ``plan_v1_early.json`` predates ``attention_macs``, ``notes``
and ``options["layout"]``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gkpd
from gkpd.plan.schema import PLAN_VERSION, CompressionPlan, LayerPlan

FIXTURES = Path(__file__).parent / "fixtures"
X = torch.randn(2, 4, 6, 6)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16))


def early_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 16))


def _load(name: str) -> CompressionPlan:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading an old file is not a deprecated use
        return CompressionPlan.load(FIXTURES / name)


def test_plan_version_is_2_and_gkpd_layers_keep_their_settings():
    assert PLAN_VERSION == 2
    plan = gkpd.plan(early_net(), X[:1], ratio=2, min_params=0, tolerance=0.2)
    data = json.loads(plan.to_json())
    assert data["version"] == 2
    layer = next(entry for entry in data["layers"] if entry["method"] == "gkpd")
    assert not {"a_shape", "b_shape", "rank", "order"} & set(layer)
    assert {"a_shape", "b_shape", "rank", "path"} <= set(layer["settings"])
    assert CompressionPlan.from_json(plan.to_json()) == plan


def test_an_early_version_1_plan_loads_and_applies():
    plan = _load("plan_v1_early.json")
    assert plan.version == PLAN_VERSION and plan.attention_macs == 0 and plan.notes == []
    assert plan.layout == "contiguous"
    entry = plan.layer("3")
    assert entry.settings == {"a_shape": [16, 2], "b_shape": [1, 64], "rank": 9,
                              "path": "b_first"}
    assert plan.layer("0").settings == {} and not plan.layer("0").compressed
    model = gkpd.apply_(early_net(), plan)
    assert (model[3].a_shape, model[3].rank) == ((16, 2), 9)
    assert sum(p.numel() for p in model.parameters()) == plan.params
    assert model(X).shape == (2, 16)


def test_a_version_1_latency_plan_keeps_its_timed_paths():
    plan = _load("plan_v1_latency.json")
    assert plan.layer("2").settings == {
        "a_shape": [1, 4, 3, 3], "b_shape": [8, 2, 1, 1], "rank": 5, "path": "weight",
        "latency_batch": 2, "latency_ms": 0.2304, "dense_latency_ms": 0.2304,
    }
    model = gkpd.apply_(net(), plan)
    assert (model[2].path, model[5].path) == ("weight", "b_first")  # pinned, as timed
    assert (model[2].a_shape, model[2].rank, model[5].a_shape) == ((1, 4, 3, 3), 5, (16, 2))
    assert sum(p.numel() for p in model.parameters()) == plan.params
    assert plan.layout == "contiguous" and plan.latency_speedup() == pytest.approx(0.4183 / 0.4227)


def test_a_version_1_svd_plan_keeps_its_rank_once():
    plan = _load("plan_v1_svd.json")
    assert [e.settings for e in plan.layers] == [{}, {"rank": 3}, {"rank": 6}]
    model = gkpd.apply_(net(), plan)
    assert sum(p.numel() for p in model.parameters()) == plan.params


def test_a_model_saved_with_a_version_1_plan_loads(tmp_path):
    """A save directory of gkpd version 1: the plan file is rewritten by hand as version 1
    (the weights and the manifest do not depend on the plan's version)."""
    plan = _load("plan_v1_latency.json")
    compressed = gkpd.apply_(net(), plan)
    gkpd.save(tmp_path / "m", compressed, plan)
    (tmp_path / "m" / "plan.json").write_text((FIXTURES / "plan_v1_latency.json").read_text())
    manifest_path = tmp_path / "m" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    plan_file = tmp_path / "m" / "plan.json"
    from gkpd.files import file_sha256

    manifest["files"]["plan.json"] = {"bytes": plan_file.stat().st_size,
                                      "sha256": file_sha256(plan_file)}
    manifest_path.write_text(json.dumps(manifest))
    loaded = gkpd.load(tmp_path / "m", net())
    assert loaded[5].path == "b_first"
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), compressed.eval()(X))


def test_unknown_versions_and_bad_settings_are_refused(tmp_path):
    data = json.loads((FIXTURES / "plan_v1_early.json").read_text())
    for version in (0, 3, None):
        with pytest.raises(ValueError, match="plan version .* reads versions 1, 2"):
            CompressionPlan.from_dict({**data, "version": version})
    data["layers"][1]["settings"] = [1]
    with pytest.raises(ValueError, match="settings must be an object"):
        CompressionPlan.from_dict(data)
    v2 = json.loads(_load("plan_v1_early.json").to_json())
    v2["layers"][1]["a_shape"] = [16, 2]  # a version 1 field in a version 2 file
    with pytest.raises(ValueError, match="unknown fields \\['a_shape'\\]"):
        CompressionPlan.from_dict(v2)
    v2 = json.loads(_load("plan_v1_early.json").to_json())
    v2["layers"][1]["settings"]["rank"] = 0
    with pytest.raises(ValueError, match="gkpd layer '3': rank must be a positive int"):
        gkpd.apply_(early_net(), CompressionPlan.from_dict(v2))
    del v2["layers"][1]["settings"]["a_shape"]
    with pytest.raises(ValueError, match="'3' \\(gkpd\\) has no 'a_shape' in its settings"):
        gkpd.apply_(early_net(), CompressionPlan.from_dict(v2))


def test_version_1_attributes_and_keywords_still_work_with_a_warning():
    with pytest.deprecated_call(match="settings=\\{"):
        entry = LayerPlan("fc", "Linear", (16, 128), (1, 128), 2064, 2048, method="gkpd",
                          a_shape=(16, 2), b_shape=(1, 64), rank=9, order=None,
                          settings={"init": "whitened"})
    assert entry.settings == {"a_shape": [16, 2], "b_shape": [1, 64], "rank": 9,
                              "init": "whitened"}
    with pytest.deprecated_call(match="LayerPlan.a_shape is deprecated"):
        assert entry.a_shape == (16, 2)
    with pytest.deprecated_call(match=r"LayerPlan.order is deprecated: use .*\['path'\]"):
        assert entry.order is None
    with pytest.deprecated_call(match="LayerPlan.rank is deprecated"):
        entry.rank = 4
    with pytest.deprecated_call(match="LayerPlan.order is deprecated"):
        entry.order = "b_first"
    assert entry.settings["rank"] == 4 and entry.settings["path"] == "b_first"
    with pytest.deprecated_call():
        entry.order = None
    assert "path" not in entry.settings
