"""``reproduce quartic``: the Inexact Polyak paper's synthetic experiment (ALGORITHMS §1.4, §6.2).

f(x) = L0 L1² x⁴ / 72 + L0 x² / 4 + f*  is (L0, L1)-smooth; L0 = 1, x0 = 5, f* = 1, l* = 0 (the lower bound
the parameter-free methods are given), L1 ∈ {1, 10, 100, 1000}. GD and clipped GD use the paper's tuned
settings, which differ per L1 (Table 3); Polyak knows f*; DecSPS, AdaSPS, DoG and Inexact Polyak get
nothing tuned. The claim: Inexact Polyak's gap f(x_best) − f* does not depend on L1, while GD's
convergence does (its tuned step shrinks as 1/L1², so its progress does too).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

import lrfree

from .output import Output, UsageError, markdown_table, new_figure

L0, X0, F_STAR, LOWER_BOUND = 1.0, 5.0, 1.0, 0.0
L1_VALUES = (1.0, 10.0, 100.0, 1000.0)
# Table 3 of the paper: GD learning rates and clipped GD (lr 0.1) thresholds, tuned per L1
GD_LR = {1.0: 1e-1, 10.0: 1e-3, 100.0: 1e-5, 1000.0: 1e-7}
CLIP_THRESHOLD = {1.0: 20.0, 10.0: 10.0, 100.0: 10.0, 1000.0: 10.0}


def f(x: torch.Tensor, l1: float) -> torch.Tensor:
    return L0 * l1 ** 2 / 72 * x ** 4 + L0 / 4 * x ** 2 + F_STAR


def methods(steps: int) -> dict[str, Callable]:
    """name -> (params, L1) -> optimizer."""
    def tuned(table: dict, l1: float, what: str):
        if l1 not in table:
            raise UsageError(f"{what} has tuned settings for L1 in {sorted(table)} only, not {l1:g}")
        return table[l1]

    return {
        "GD (tuned per L1)": lambda p, l1: lrfree.ClippedSGD(p, lr=tuned(GD_LR, l1, "GD"), max_norm=math.inf),
        "clipped GD (tuned per L1)": lambda p, l1: lrfree.ClippedSGD(
            p, lr=0.1, max_norm=tuned(CLIP_THRESHOLD, l1, "clipped GD")),
        "Polyak (knows f*)": lambda p, l1: lrfree.InexactPolyak(p, T=1, lower_bound=F_STAR),
        "DecSPS": lambda p, l1: lrfree.DecSPS(p, lower_bound=LOWER_BOUND),
        "AdaSPS": lambda p, l1: lrfree.AdaSPS(p, lower_bound=LOWER_BOUND),
        "DoG": lambda p, l1: lrfree.DoG(p),
        f"Inexact Polyak (T={steps})": lambda p, l1: lrfree.InexactPolyak(p, T=steps, lower_bound=LOWER_BOUND),
    }


def best_gaps(make: Callable, l1: float, steps: int) -> list[float]:
    """f(x_best) − f* after every step (x_0 included in the best), in fp64."""
    x = torch.tensor([X0], dtype=torch.float64, requires_grad=True)
    opt = make([x], l1)
    best = float(f(x.detach(), l1))
    gaps = []
    for _ in range(steps):
        opt.zero_grad()
        loss = f(x, l1).sum()
        loss.backward()
        best = min(best, float(loss.detach()))
        opt.step(loss=loss.detach())
        value = float(f(x.detach(), l1))
        best = min(best, value) if math.isfinite(value) else best
        gaps.append(best - F_STAR)
    return gaps


def run_quartic(steps: int, l1_values: tuple[float, ...], out: Output) -> dict:
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if not l1_values or any(not (l1 >= 0 and math.isfinite(l1)) for l1 in l1_values):
        raise UsageError(f"--l1 values must be finite and >= 0, got {l1_values}")
    record = {}
    for name, make in methods(steps).items():
        record[name] = {str(l1): best_gaps(make, l1, steps) for l1 in l1_values}
    rows = [[name] + [f"{curves[str(l1)][-1]:.2e}" for l1 in l1_values] for name, curves in record.items()]
    table = (f"### (L0, L1) quartic: f(x_best) − f* after {steps} steps (x0 = {X0:g}, f* = {F_STAR:g}, "
             f"l* = {LOWER_BOUND:g})\n\n" + markdown_table(["method"] + [f"L1 = {l1:g}" for l1 in l1_values], rows))
    out.text("table.md", table)
    out.json("results.json", {"steps": steps, "gaps": record})

    ncols = 4
    nrows = -(-len(record) // ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=3.2, height=2.8)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(record):]:
        ax.set_visible(False)
    for ax, (name, curves) in zip(flat, record.items()):
        for l1 in l1_values:
            ax.plot([max(g, 1e-16) for g in curves[str(l1)]], label=f"L1={l1:g}")
        ax.set(yscale="log", xlabel="step", title=name)
        ax.title.set_fontsize(9)
    for row in axes:
        row[0].set_ylabel("f(x_best) − f*")
    axes[0][0].legend(fontsize=7)
    out.figure("quartic.png", fig)
    print(table)
    print("written: " + ", ".join(str(p) for p in out.written))
    return record
