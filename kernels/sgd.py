"""Apply pass of every SGD-direction method (the Polyak family, DoG, LDoG):

    x ← x − c_t · (g + λ_t x)          (per-tensor step c_t and coupled weight decay λ_t)

optionally copying x into a best-iterate buffer first (Inexact Polyak's ``best_iterate``). One launch
per parameter dtype; a rejected step returns before touching memory. Bytes: R 8 (x, g), W 4 (x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import dtype_groups, launch, ok_flag


@triton.jit
def _sgd_apply_kernel(x_ptrs, g_ptrs, best_ptrs, numels, block_tensor, block_start, coef, decay, ok, copy_best,
                      sr_seeds, X: tl.constexpr, ACC: tl.constexpr, HAS_DECAY: tl.constexpr, TRACK_BEST: tl.constexpr,
                      SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    if HAS_DECAY:
        g = g + tl.load(decay + t).to(ACC) * x
    if TRACK_BEST:
        if tl.load(copy_best) != 0:
            tl.store(tensor_ptr(best_ptrs, t, X, ALIGNED) + offs, x.to(X), mask=mask)
    tl.store(x_ptr + offs, to_param(x - tl.load(coef + t).to(ACC) * g, X, SR, sr_seeds, t, offs), mask=mask)


def sgd_apply(opt, batch, coef: torch.Tensor, decay: torch.Tensor | None = None,
              copy_best: torch.Tensor | None = None) -> None:
    """``coef``/``decay``: (items,) fp64 device vectors; ``copy_best``: 0-d bool, store x in
    ``state['best']`` before the update (the caller handles parameters without a gradient)."""
    track = copy_best is not None
    best_flag = copy_best.to(torch.int32) if track else ok_flag(batch)
    for group in dtype_groups(batch, (lambda it: (it.p, it.g, it.state["best"])) if track else
                              (lambda it: (it.p, it.g))):
        geo = group.geo
        launch(_sgd_apply_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2) if track else geo.slot(0),
               geo.numels, geo.block_tensor, geo.block_start, group.take(coef),
               group.take(decay) if decay is not None else coef, ok_flag(batch), best_flag,
               X=group.tl_dtype, ACC=group.acc, HAS_DECAY=decay is not None, TRACK_BEST=track, **group.tiling(warps=4), **rounding(batch, group))
