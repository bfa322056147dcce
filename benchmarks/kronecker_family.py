"""Which structure of the Kronecker family keeps most of the weights per parameter (issue 12,
item 2: "find out what structure in the Kronecker family would [win]").

GKPD is a sum of Kronecker products of *two* factors. The family goes on: a sum of Kronecker
products of N factors, ``W ≈ Σ_r F1_r ⊗ F2_r ⊗ … ⊗ FN_r``, whose best fit is the rank-R CP
decomposition of W rearranged into an N-way tensor (factor n's index of every mode gathered on
axis n: the two-factor case is the NKP matrix and its SVD). CP of a conv kernel (Lebedev et
al.) is the member whose every factor lies along one mode: ``(F,1,1,1) ⊗ (1,C,1,1) ⊗
(1,1,k,1) ⊗ (1,1,1,k)``. Each term of N factors costs ``Σ_n ∏ shape_n`` parameters, so more
factors buy more terms for the same size.

For every layer that ``gkpd.plan`` compresses at each ratio, and at the parameter count that
GKPD's plan gives that layer, this prints the relative weight error ``‖W − Ŵ‖/‖W‖`` of:

  gkpd             the plan's two-factor split and rank (what ``gkpd.compress`` builds)
  tucker, cp       ``gkpd.plan(..., method="tucker"/"cp")`` at the same whole-model ratio
                   (their own per-layer sizes, within a few percent of GKPD's)
  nf:<shapes>      N-factor arrangements at GKPD's size per layer, fitted by CP-ALS
                   (``gkpd.methods.cp.cp_als``, 50 sweeps from an SVD start)

and the sum over layers of the squared errors (the plan's own figure of merit). Weight error
does not decide accuracy after fine-tuning (benchmarks/RESULTS.md), so this says which
structure can hold the weights, not which trains best.

usage:  python benchmarks/kronecker_family.py [--ratios 5,10] [--threads 1] \
            [--out benchmarks/kronecker_family]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import gkpd
from gkpd.files import atomic_write_json, atomic_write_text
from gkpd.methods.cp import cp_als, reconstruct

# Factor shapes of a conv weight (F, C, kh, kw) as functions of it; "gkpd-like" arrangements
# split channels across factors, the others keep every channel axis in one factor.
ARRANGEMENTS = {
    "(F)(C)(kh)(kw)  [= cp]": lambda f, c, kh, kw: [
        (f, 1, 1, 1),
        (1, c, 1, 1),
        (1, 1, kh, 1),
        (1, 1, 1, kw),
    ],
    "(F)(C)(kh,kw)": lambda f, c, kh, kw: [(f, 1, 1, 1), (1, c, 1, 1), (1, 1, kh, kw)],
    "(C,kw)(F)(kh)": lambda f, c, kh, kw: [(1, c, 1, kw), (f, 1, 1, 1), (1, 1, kh, 1)],
    "(F/4,C/4,kh)(4,4,1,kw)": lambda f, c, kh, kw: [(f // 4, c // 4, kh, 1), (4, 4, 1, kw)],
    "(F/4,C/4,kh)(2,2,1,kw)(2,2)": lambda f, c, kh, kw: [
        (f // 4, c // 4, kh, 1),
        (2, 2, 1, kw),
        (2, 2, 1, 1),
    ],
}


def rearrange_n(w: torch.Tensor, shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """W (∏ over factors of each mode) as the N-way tensor (∏ shape_1, …, ∏ shape_N): factor
    n's index of every mode on axis n, the first factor the most significant (as ``gkpd.kron``)."""
    n, d = len(shapes), w.ndim
    t = w.reshape([s[mode] for mode in range(d) for s in shapes])
    t = t.permute([mode * n + k for k in range(n) for mode in range(d)])
    return t.reshape([math.prod(s) for s in shapes])


def check_rearrange_n() -> None:
    """Oracle: one term F1 ⊗ F2 ⊗ F3 (``gkpd.kron``) rearranges to the outer product of the
    factors' vectors, and two factors give ``gkpd.rearrange``."""
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 1, 2), (3, 1, 2, 2), (1, 2, 3, 1)]
    factors = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    w = gkpd.kron(gkpd.kron(factors[0], factors[1]), factors[2])
    outer = torch.einsum("a,b,c->abc", *(f.reshape(-1) for f in factors))
    if not torch.allclose(rearrange_n(w, shapes), outer):
        raise RuntimeError("rearrange_n does not invert gkpd.kron")
    w = torch.randn(6, 4, 3, 3, generator=g)
    if not torch.equal(
        rearrange_n(w, [(2, 4, 3, 1), (3, 1, 1, 3)]), gkpd.rearrange(w, (2, 4, 3, 1))
    ):
        raise RuntimeError("rearrange_n with two factors differs from gkpd.rearrange")


def arrangement_error(w: torch.Tensor, shapes: list[tuple[int, ...]], budget: int) -> float | None:
    rank = budget // sum(math.prod(s) for s in shapes)
    if rank < 1:
        return None
    if len(shapes) == 2:  # the NKP: GKPD itself
        return float(gkpd.decompose(w.double(), shapes[0], shapes[1], rank).relative_error)
    t = rearrange_n(w.double(), shapes)
    fit = reconstruct(cp_als(t, rank))
    return float((fit - t).norm() / t.norm())


def family_rows(teacher: torch.nn.Module, x: torch.Tensor, ratio: float) -> dict:
    modules = dict(teacher.named_modules())
    plans = {m: gkpd.plan(teacher, x, ratio=ratio, method=m) for m in ("gkpd", "tucker", "cp")}
    layers = []
    for entry in plans["gkpd"].compressed_layers:
        w = modules[entry.name].weight.detach()
        if w.ndim != 4 or any(e % 4 for e in w.shape[:2]):
            continue
        budget = entry.params - (
            entry.weight_shape[0] if modules[entry.name].bias is not None else 0
        )
        row = {
            "layer": entry.name,
            "weight_shape": list(w.shape),
            "params": budget,
            "gkpd": entry.relative_error,
        }
        for method in ("tucker", "cp"):
            other = plans[method].layer(entry.name)
            row[method] = other.relative_error
            row[f"{method}_params"] = other.params
        for name, shapes in ARRANGEMENTS.items():
            row[f"nf:{name}"] = arrangement_error(w, shapes(*w.shape), budget)
        layers.append(row)
    return {
        "ratio": ratio,
        "achieved": {m: p.achieved_ratio for m, p in plans.items()},
        "layers": layers,
    }


def table(result: dict) -> str:
    columns = ["gkpd", "tucker", "cp", *(f"nf:{n}" for n in ARRANGEMENTS)]
    lines = [
        f"### {result['ratio']:g}x (whole-model ratios: "
        + ", ".join(f"{m} {r:.2f}x" for m, r in result["achieved"].items())
        + ")",
        "",
        "| structure | Σ squared relative error | mean relative error | layers |",
        "|---|---|---|---|",
    ]
    for column in columns:
        errors = [row[column] for row in result["layers"] if row[column] is not None]
        lines.append(
            f"| {column} | {sum(e * e for e in errors):.3f} | "
            f"{sum(errors) / len(errors):.3f} | {len(errors)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratios", default="5,10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/kronecker_family"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check_rearrange_n()
    teacher = gkpd.models.load_pretrained("resnet32_fashion_mnist").eval()
    x = torch.zeros(1, 1, 28, 28)
    results = [family_rows(teacher, x, float(r)) for r in args.ratios.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "results.json", results, indent=1)
    text = "".join(table(r) + "\n" for r in results)
    atomic_write_text(args.out / "results.md", text)
    print(text)


if __name__ == "__main__":
    main()
