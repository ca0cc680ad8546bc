"""D-Adapt SGD in one pass (ALGORITHMS §4.5): for every tensor t, with λ_t = c_t·dlr (its group's lr ratio
times the shared step, an fp64 per-tensor vector) and wd, β from group 0

    g ← g + wd x;   (lr > 0)  ⟨g, s⟩ (old s),  s ← s + λ_t g,  Σ s²;   x ← β x + (1 − β)(x0 − s)

R 16 (g, x, s, x0), W 8 (s, x); partials ⟨g, s_old⟩ and ‖s_new‖² per tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials


@triton.jit
def _dadapt_sgd_kernel(x_ptrs, g_ptrs, s_ptrs, x0_ptrs, numels, block_tensor, block_start, adapting, dlr, ok,
                       partials, coeffs, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    # the accept flag as a block mask (stores of a rejected step are masked off)
    accept = (tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, ACC, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    decay = tl.load(coeffs).to(ACC)
    beta = tl.load(coeffs + 1).to(ACC)
    averaging = tl.load(coeffs + 2).to(ACC)  # 1 − β, formed in fp64 on the host
    g = g + decay * x
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    if tl.load(adapting + t) != 0:
        tl.store(partials + 2 * pid, tl.sum(g * s, axis=0))
        s = s + tl.load(dlr + t).to(ACC) * g
        tl.store(partials + 2 * pid + 1, tl.sum(s * s, axis=0))
        tl.store(s_ptr + offs, s, mask=mask & accept)
    else:
        tl.store(partials + 2 * pid, 0.0)
        tl.store(partials + 2 * pid + 1, 0.0)
    x0 = tl.load(tensor_ptr(x0_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    tl.store(x_ptr + offs, to_param(x * beta + (x0 - s) * averaging, X, SR, sr_seeds, t, offs), mask=mask & accept)


def dadapt_sgd_step(opt, batch, steps: torch.Tensor, decay: float, beta: float) -> torch.Tensor:
    """``steps``: every tensor's c·λ (fp64, one per item)."""
    adapting = batch.vector(float(it.group["lr"] > 0) for it in batch.items)
    parts = []
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state["s"], it.state["x0"])):
        geo = group.geo
        partials = group.partials(2)
        launch(_dadapt_sgd_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2), geo.slot(3), geo.numels,
               geo.block_tensor, geo.block_start, group.take(adapting), group.take(steps), ok_flag(batch), partials,
               batch.vector((decay, beta, 1.0 - beta)),
               X=group.tl_dtype, ACC=group.acc, **group.tiling(warps=4), **rounding(batch, group))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)
