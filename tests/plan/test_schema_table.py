"""The plan table shows each layer's method settings compactly, in one "settings" column."""

from gkpd.plan.schema import CompressionPlan, LayerPlan


def _layer(name, method, **kwargs):
    return LayerPlan(name, "Conv2d", (16, 16, 3, 3), (1, 16, 8, 8), 2304, 147456,
                     method=method, params=500, macs=1000, **kwargs)


def test_table_has_a_compact_settings_column():
    plan = CompressionPlan(
        model_type="Net", method="tucker", target_ratio=2.0, strategy="uniform",
        objective="error", dense_params=5000, params=2500, dense_macs=1, macs=1,
        layers=[
            _layer("a", "tucker", settings={"ranks": [4, 8], "iterations": 10}),
            _layer("b", "tensor_train",
                   settings={"rank": 3, "in_modes": [4, 4], "out_modes": [4, 4]}),
            _layer("c", "gkpd", settings={"a_shape": [4, 4, 3, 1], "b_shape": [4, 4, 1, 3],
                                          "rank": 2, "path": "b_first", "latency_batch": 8}),
            _layer("d", "dense"),
        ],
    )
    lines = plan.table().splitlines()
    header = lines[0].split()
    assert header[:4] == ["layer", "method", "settings", "params"]
    row = {line.split()[0]: line for line in lines[2:6]}
    assert "ranks=4,8" in row["a"] and "iterations" not in row["a"]
    assert "rank=3 in_modes=4,4 out_modes=4,4" in row["b"]
    # shapes as a product; the plan's latency batch is in the footer, not in each row
    assert "a_shape=4×4×3×1 b_shape=4×4×1×3 rank=2 path=b_first 500" in " ".join(
        row["c"].split())
    assert "latency_batch" not in row["c"] and row["d"].split()[2] == "-"
    assert all(len(line) < 200 for line in lines)
