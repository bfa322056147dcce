"""The plan table shows each layer's method settings compactly (a "settings" column)."""

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
            _layer("b", "tensor_train", rank=3,
                   settings={"rank": 3, "in_modes": [4, 4], "out_modes": [4, 4]}),
            _layer("c", "gkpd", a_shape=(4, 4, 3, 1), b_shape=(4, 4, 1, 3), rank=2,
                   order="b_first"),
            _layer("d", "dense"),
        ],
    )
    lines = plan.table().splitlines()
    header = lines[0].split()
    assert header[:7] == ["layer", "method", "a_shape", "b_shape", "rank", "order", "settings"]
    row = {line.split()[0]: line for line in lines[2:6]}
    assert "ranks=4,8" in row["a"] and "iterations" not in row["a"]
    assert "rank=3 in_modes=4,4 out_modes=4,4" in row["b"]
    assert row["c"].split()[6] == "-" and row["d"].split()[6] == "-"
    assert all(len(line) < 200 for line in lines)
