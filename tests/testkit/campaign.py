"""Fake accuracy-campaign directories, as `gkpd bench accuracy --seed N` writes them."""

import json

BUDGET = {
    "alpha": 0.9,
    "batch_size": 128,
    "epochs": 3,
    "lr": 0.01,
    "student_lr": 0.1,
    "temperature": 4.0,
    "train_subset": None,
    "weight_decay": 0.0005,
}


def cell(root, seed, method, ratio, after, status="ok", budget=(), **extra):
    seed_dir = root / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    (seed_dir / "bench.json").write_text(
        json.dumps(
            {
                "budget": {**BUDGET, **dict(budget), "seed": seed},
                "context": {"model": "m", "data": "d"},
            }
        )
    )
    (seed_dir / "dense.json").write_text(
        json.dumps({"method": "dense", "accuracy_after": 94.0, "params": 1000})
    )
    result = {
        "method": method,
        "ratio": ratio,
        "achieved_ratio": ratio,
        "params": 1000 / ratio,
        "macs": 10,
        "accuracy_before": 50.0,
        "accuracy_after": after,
        "status": status,
        "epochs": 3,
        **extra,
    }
    (seed_dir / f"{method}-{ratio:g}x").mkdir()
    (seed_dir / f"{method}-{ratio:g}x" / "result.json").write_text(json.dumps(result))


def lr_campaign(root):
    """gkpd is best at lr 0.01 (two seeds there), cp at lr 0.001."""
    shared, low = root / "cells", root / "cells-lr0.001"
    cell(shared, 0, "gkpd", 5.0, 93.5)
    cell(shared, 1, "gkpd", 5.0, 93.3)
    cell(shared, 0, "cp", 5.0, 88.0)
    cell(low, 0, "gkpd", 5.0, 93.0, budget={"lr": 0.001})
    cell(low, 0, "cp", 5.0, 93.7, budget={"lr": 0.001})
    return shared, low
