"""Adam / AdamW in one pass, torch.optim semantics, per-tensor step counts (R 16: g, x, m, v; W 12):

    g ← ±g (+ wd x, Adam);  x ← x (1 − lr wd) (AdamW);  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²
    (amsgrad: v̂ ← max(v̂, v));  x ← x − (lr / bc1) m / (√v / √bc2 + ε)

Per-tensor lr, betas, eps, wd and bias corrections arrive as fp64 device vectors; the complements
1 − β are formed in fp64 (in fp32, 1 − 0.999 loses four digits)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import dtype_groups, launch, ok_flag


@triton.jit
def adam_moments(m, v, g, row, ACC: tl.constexpr):
    """The new first and second moments from the stored ones and the gradient; ``row`` starts with the
    tensor's (β1, 1−β1, β2, 1−β2). Shared with GLyDER's Adam direction (kernels/glyder.py)."""
    m = tl.load(row).to(ACC) * m + tl.load(row + 1).to(ACC) * g
    v = tl.load(row + 2).to(ACC) * v + tl.load(row + 3).to(ACC) * g * g
    return m, v


@triton.jit
def _adam_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, numels, block_tensor, block_start, table, ok,
                 sr_seeds, X: tl.constexpr, ACC: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                 SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    # per tensor: (β1, 1−β1, β2, 1−β2, eps, wd, 1 − lr·wd, step size lr/bc1, √bc2, sign)
    row = table + 10 * t
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, ACC, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, ACC, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC) * tl.load(row + 9).to(ACC)
    if DECOUPLED:
        x = x * tl.load(row + 6).to(ACC)
    else:
        g = g + tl.load(row + 5).to(ACC) * x
    m, v = adam_moments(tl.load(m_ptr + offs, mask=mask), tl.load(v_ptr + offs, mask=mask), g, row, ACC)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        vmax_ptr = tensor_ptr(vmax_ptrs, t, ACC, ALIGNED)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
        tl.store(vmax_ptr + offs, v, mask=mask)
    denom = tl.sqrt(v) / tl.load(row + 8).to(ACC) + tl.load(row + 4).to(ACC)
    tl.store(x_ptr + offs, to_param(x - tl.load(row + 7).to(ACC) * (m / denom), X, SR, sr_seeds, t, offs), mask=mask)


def adam_step(opt, batch, step: torch.Tensor) -> None:
    """``step``: (items,) fp64 step counts t (this step included)."""
    vec = batch.per_item
    beta1 = batch.vector(it.group["betas"][0] for it in batch.items)
    beta2 = batch.vector(it.group["betas"][1] for it in batch.items)
    lr, wd = vec("lr"), vec("weight_decay")
    table = torch.stack([
        beta1, batch.vector(1 - it.group["betas"][0] for it in batch.items),
        beta2, batch.vector(1 - it.group["betas"][1] for it in batch.items),
        vec("eps"), wd, 1 - lr * wd, lr / (1 - beta1 ** step), (1 - beta2 ** step).sqrt(),
        batch.vector(-1.0 if it.group["maximize"] else 1.0 for it in batch.items)], dim=1).contiguous()

    def slots(it, amsgrad):
        st = it.state
        return (it.p, it.g, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"])

    for group in dtype_groups(batch, slots, key=lambda it: it.group["amsgrad"]):
        geo = group.geo
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_adam_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(5)), geo.numels, geo.block_tensor,
               geo.block_start, rows, ok_flag(batch), X=group.tl_dtype, ACC=group.acc, DECOUPLED=opt.decoupled,
               AMSGRAD=group.variant, **group.tiling(warps=4), **rounding(batch, group))
