"""Clipped SGD apply pass: d = κ g + λ x;  b ← μ b + d (and d ← d + μ b with Nesterov, else d ← b);
x ← x − lr d. The clip coefficient κ (its group's, from the global norm), lr, λ, μ and Nesterov are per
tensor (param groups). Tensors with and without a momentum buffer launch separately. Bytes: R 8 (+4), W 4 (+4)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import dtype_groups, launch, ok_flag


@triton.jit
def _clipped_apply_kernel(x_ptrs, g_ptrs, buf_ptrs, numels, block_tensor, block_start, clip, lr, decay, momentum,
                          nesterov, ok, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, HAS_BUF: tl.constexpr,
                          SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    d = g * tl.load(clip + t).to(ACC) + tl.load(decay + t).to(ACC) * x
    if HAS_BUF:
        buf_ptr = tensor_ptr(buf_ptrs, t, ACC, ALIGNED)
        mu = tl.load(momentum + t).to(ACC)
        buf = mu * tl.load(buf_ptr + offs, mask=mask) + d
        tl.store(buf_ptr + offs, buf, mask=mask)
        d = tl.where(tl.load(nesterov + t) != 0, d + mu * buf, buf)
    tl.store(x_ptr + offs, to_param(x - tl.load(lr + t).to(ACC) * d, X, SR, sr_seeds, t, offs), mask=mask)


def clipped_apply(opt, batch, clip: torch.Tensor) -> None:
    """``clip``: every tensor's κ (fp64, one per item)."""
    lr, decay = batch.per_item("lr"), batch.per_item("weight_decay")
    momentum = batch.per_item("momentum")
    nesterov = batch.vector(float(it.group["nesterov"]) for it in batch.items)

    def slots(it, has_buf):
        return (it.p, it.g, it.state["momentum_buffer"]) if has_buf else (it.p, it.g)

    for group in dtype_groups(batch, slots, key=lambda it: it.group["momentum"] > 0):
        geo = group.geo
        launch(_clipped_apply_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1),
               geo.slot(2) if group.variant else geo.slot(0), geo.numels, geo.block_tensor, geo.block_start, group.take(clip),
               group.take(lr), group.take(decay), group.take(momentum), group.take(nesterov), ok_flag(batch),
               X=group.tl_dtype, ACC=group.acc, HAS_BUF=group.variant, **group.tiling(warps=4), **rounding(batch, group))
