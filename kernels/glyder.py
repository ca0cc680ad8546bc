"""GLyDER along the Adam direction (lrfree.glyder): d = m̂/(√v̂ + ε) (+ wd·x, decoupled) is never stored.

Pass A updates m and v (v̂max with amsgrad) and reduces per tensor ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩ and ⟨g, d⟩
(a: the gradient, or the other half-batch's; ĝ: the sampled-label gradient), forming d in registers.
Pass B recomputes d from the new m and v and applies x ← x − c·d. Bytes: A reads x, g, m, v (+ a, ĝ) and
writes m, v (R 12–24, W 8: x only with weight decay); B reads x, m, v and writes x (R 12, W 4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials


@triton.jit
def _direction(m, v, x, row, ACC: tl.constexpr, DECOUPLED: tl.constexpr):
    # row: (β1, 1−β1, β2, 1−β2, ε, wd, 1/(1−β1^t), 1/√(1−β2^t))
    d = (m * tl.load(row + 6).to(ACC)) / (tl.sqrt(v) * tl.load(row + 7).to(ACC) + tl.load(row + 4).to(ACC))
    if DECOUPLED:
        d = d + tl.load(row + 5).to(ACC) * x
    return d


@triton.jit
def _stats_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, a_ptrs, gnb_ptrs, numels, block_tensor, block_start,
                  table, ok, partials, X: tl.constexpr, ACC: tl.constexpr, DECOUPLED: tl.constexpr,
                  AMSGRAD: tl.constexpr, HAS_PROBE: tl.constexpr, HAS_GNB: tl.constexpr, HAS_DECAY: tl.constexpr,
                  BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    accept = mask & ((tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0)
    row = table + 8 * t
    m_ptr = tensor_ptr(m_ptrs, t, ACC, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, ACC, ALIGNED)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    x = tl.zeros([BLOCK], dtype=ACC)
    if HAS_DECAY:  # x enters pass A only through weight decay: without it, it is not read
        x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if not DECOUPLED:
            g = g + tl.load(row + 5).to(ACC) * x
    m = tl.load(row).to(ACC) * tl.load(m_ptr + offs, mask=mask, other=0.0) + tl.load(row + 1).to(ACC) * g
    v = tl.load(row + 2).to(ACC) * tl.load(v_ptr + offs, mask=mask, other=0.0) + tl.load(row + 3).to(ACC) * g * g
    tl.store(m_ptr + offs, m, mask=accept)
    tl.store(v_ptr + offs, v, mask=accept)
    if AMSGRAD:
        vmax_ptr = tensor_ptr(vmax_ptrs, t, ACC, ALIGNED)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
        tl.store(vmax_ptr + offs, v, mask=accept)
    d = tl.where(mask, _direction(m, v, x, row, ACC, DECOUPLED and HAS_DECAY), 0.0)
    a = g
    if HAS_PROBE:
        a = tl.load(tensor_ptr(a_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    tl.store(partials + 4 * pid, tl.sum(a * d, axis=0))
    tl.store(partials + 4 * pid + 1, tl.sum(d * d, axis=0))
    if HAS_GNB:
        gnb = tl.load(tensor_ptr(gnb_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        tl.store(partials + 4 * pid + 2, tl.sum(gnb * d, axis=0))
    else:
        tl.store(partials + 4 * pid + 2, 0.0)
    tl.store(partials + 4 * pid + 3, tl.sum(g * d, axis=0))


@triton.jit
def _apply_kernel(x_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, table, coef, ok, sr_seeds,
                  X: tl.constexpr, ACC: tl.constexpr, DECOUPLED: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    row = table + 8 * t
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    m = tl.load(tensor_ptr(m_ptrs, t, ACC, ALIGNED) + offs, mask=mask)
    v = tl.load(tensor_ptr(v_ptrs, t, ACC, ALIGNED) + offs, mask=mask)
    d = _direction(m, v, x, row, ACC, DECOUPLED)
    tl.store(x_ptr + offs, to_param(x - tl.load(coef + t).to(ACC) * d, X, SR, sr_seeds, t, offs), mask=mask)


def _table(opt, batch, step: torch.Tensor) -> torch.Tensor:
    beta1 = batch.vector(it.group["betas"][0] for it in batch.items)
    beta2 = batch.vector(it.group["betas"][1] for it in batch.items)
    return torch.stack([beta1, batch.vector(1 - it.group["betas"][0] for it in batch.items),
                        beta2, batch.vector(1 - it.group["betas"][1] for it in batch.items),
                        batch.per_item("eps"), batch.per_item("weight_decay"), 1 / (1 - beta1 ** step),
                        (1 - beta2 ** step).rsqrt()], dim=1).contiguous()


def _v(it):
    return it.state["max_exp_avg_sq"] if it.group["amsgrad"] else it.state["exp_avg_sq"]


def glyder_adam_stats(opt, batch, step: torch.Tensor, probe: dict | None, gnb: dict | None) -> torch.Tensor:
    """(items, 4) fp64: ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩ per tensor; m and v updated."""
    table = _table(opt, batch, step)

    def slots(it, amsgrad):
        st = it.state
        return (it.p, it.g, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"],
                probe[it.param] if probe is not None else it.g, gnb[it.param] if gnb is not None else it.g)

    parts = []
    for group in dtype_groups(batch, slots, key=lambda it: it.group["amsgrad"]):
        geo = group.geo
        has_decay = any(it.group["weight_decay"] != 0 for it in group.items)
        partials = group.partials(4)
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_stats_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(7)), geo.numels, geo.block_tensor,
               geo.block_start, rows, ok_flag(batch), partials, X=group.tl_dtype, ACC=group.acc,
               DECOUPLED=opt.decoupled, AMSGRAD=group.variant, HAS_PROBE=probe is not None, HAS_GNB=gnb is not None,
               HAS_DECAY=has_decay, **group.tiling(warps=4))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)


def glyder_adam_apply(opt, batch, step: torch.Tensor, coef: torch.Tensor) -> None:
    table = _table(opt, batch, step)
    for group in dtype_groups(batch, lambda it: (it.p, it.state["exp_avg"], _v(it))):
        geo = group.geo
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_apply_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2), geo.numels, geo.block_tensor,
               geo.block_start, rows, group.take(coef), ok_flag(batch), X=group.tl_dtype, ACC=group.acc,
               DECOUPLED=opt.decoupled, **group.tiling(warps=4), **rounding(batch, group))
