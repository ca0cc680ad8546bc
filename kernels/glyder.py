"""GLyDER along the Adam direction (lrfree.glyder): d = m̂/(√v̂ + ε) (+ wd·x, decoupled) is never stored.

Pass A forms the new m and v (v̂max with amsgrad) and d in registers and reduces per tensor ⟨a, d⟩, ‖d‖²,
⟨ĝ, d⟩ and ⟨g, d⟩ (a: the gradient, or the other half-batch's; ĝ: the sampled-label gradient). Pass B
applies x ← x − c·d. The step has one of two structures, chosen by ``GLyDER._pass_a_guards``:

* **pass A is the guard** (skip_nonfinite, the default): A commits nothing and also reduces Σg², Σĝ², Σa²,
  the step's non-finite witness; B, which runs only for an accepted step, forms m and v again from g and
  stores them with x. A reads g, m, v (+ x with weight decay, a, ĝ): R 8–24, W 0; B reads x, g, m, v and
  writes x, m, v: R 16, W 12 (+4 each with amsgrad). fp32, GNB, no weight decay: 16 + 28 = 44 B.
* **pass A commits** (skip_nonfinite=False, or the finite-difference curvature, whose closure overwrites
  the gradients before B): A writes m and v (masked by the accept flag), B recomputes d from them: A R
  12–24, W 8; B R 12, W 4. fp32, GNB: 24 + 16 = 40 B, ALGORITHMS §0.1's minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import adam_moments
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
                  GUARD: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Partials per block: ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩, and under GUARD Σg², Σĝ², Σa² (columns K = 7; else K
    = 4 and m, v are stored where the step is accepted)."""
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    row = table + 8 * t
    if GUARD:
        out = partials + 7 * pid
    else:
        out = partials + 4 * pid
    m_ptr = tensor_ptr(m_ptrs, t, ACC, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, ACC, ALIGNED)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    if GUARD:  # the gradient as given: the guard's Σg²
        tl.store(out + 4, tl.sum(g * g, axis=0))
    x = tl.zeros([BLOCK], dtype=ACC)
    if HAS_DECAY:  # x enters pass A only through weight decay: without it, it is not read
        x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if not DECOUPLED:
            g = g + tl.load(row + 5).to(ACC) * x
    m, v = adam_moments(tl.load(m_ptr + offs, mask=mask, other=0.0), tl.load(v_ptr + offs, mask=mask, other=0.0),
                        g, row, ACC)
    if not GUARD:
        accept = mask & ((tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0)
        tl.store(m_ptr + offs, m, mask=accept)
        tl.store(v_ptr + offs, v, mask=accept)
    if AMSGRAD:
        vmax_ptr = tensor_ptr(vmax_ptrs, t, ACC, ALIGNED)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
        if not GUARD:
            tl.store(vmax_ptr + offs, v, mask=accept)
    d = tl.where(mask, _direction(m, v, x, row, ACC, DECOUPLED and HAS_DECAY), 0.0)
    a = g
    if HAS_PROBE:
        a = tl.load(tensor_ptr(a_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if GUARD:
            tl.store(out + 6, tl.sum(a * a, axis=0))
    elif GUARD:
        tl.store(out + 6, 0.0)
    tl.store(out, tl.sum(a * d, axis=0))
    tl.store(out + 1, tl.sum(d * d, axis=0))
    if HAS_GNB:
        gnb = tl.load(tensor_ptr(gnb_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out + 2, tl.sum(gnb * d, axis=0))
        if GUARD:
            tl.store(out + 5, tl.sum(gnb * gnb, axis=0))
    else:
        tl.store(out + 2, 0.0)
        if GUARD:
            tl.store(out + 5, 0.0)
    tl.store(out + 3, tl.sum(g * d, axis=0))


@triton.jit
def _apply_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, numels, block_tensor, block_start, table, coef, ok,
                  sr_seeds, X: tl.constexpr, ACC: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                  HAS_DECAY: tl.constexpr, MOMENTS: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr,
                  ALIGNED: tl.constexpr):
    """x ← x − c·d; under MOMENTS (pass A committed nothing) m and v are formed from g here, as pass A formed
    them, and stored; else they are read as pass A stored them."""
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    row = table + 8 * t
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, ACC, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, ACC, ALIGNED)
    vmax_ptr = tensor_ptr(vmax_ptrs, t, ACC, ALIGNED)
    if MOMENTS and HAS_DECAY and not DECOUPLED:  # coupled weight decay: x enters the moments
        x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    if MOMENTS:
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
        if HAS_DECAY and not DECOUPLED:
            g = g + tl.load(row + 5).to(ACC) * x
        m, v = adam_moments(tl.load(m_ptr + offs, mask=mask), tl.load(v_ptr + offs, mask=mask), g, row, ACC)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if AMSGRAD:
            v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
            tl.store(vmax_ptr + offs, v, mask=mask)
    else:
        m = tl.load(m_ptr + offs, mask=mask)
        if AMSGRAD:
            v = tl.load(vmax_ptr + offs, mask=mask)
        else:
            v = tl.load(v_ptr + offs, mask=mask)
    if not (MOMENTS and HAS_DECAY and not DECOUPLED):  # x loaded late: fewer registers live across the moments
        x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    d = _direction(m, v, x, row, ACC, DECOUPLED)
    tl.store(x_ptr + offs, to_param(x - tl.load(coef + t).to(ACC) * d, X, SR, sr_seeds, t, offs), mask=mask)


def _table(opt, batch, step: torch.Tensor) -> torch.Tensor:
    beta1 = batch.vector(it.group["betas"][0] for it in batch.items)
    beta2 = batch.vector(it.group["betas"][1] for it in batch.items)
    return torch.stack([beta1, batch.vector(1 - it.group["betas"][0] for it in batch.items),
                        beta2, batch.vector(1 - it.group["betas"][1] for it in batch.items),
                        batch.per_item("eps"), batch.per_item("weight_decay"), 1 / (1 - beta1 ** step),
                        (1 - beta2 ** step).rsqrt()], dim=1).contiguous()


def _slots(it, amsgrad: bool, grad: bool = True) -> tuple:
    """x, g, m, v, v̂max: the streams both passes share (g only where read; v twice without amsgrad)."""
    st = it.state
    return (it.p, it.g if grad else it.p, st["exp_avg"], st["exp_avg_sq"],
            st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"])


def _has_decay(group) -> bool:
    return any(it.group["weight_decay"] != 0 for it in group.items)


def glyder_adam_stats(opt, batch, step: torch.Tensor, probe: dict | None, gnb: dict | None) -> torch.Tensor:
    """(items, 4) fp64: ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩ per tensor, m and v updated where the step is accepted;
    or, when pass A is the guard, (items, 7) with Σg², Σĝ², Σa² after them and nothing written."""
    guard = opt._pass_a_guards
    table = _table(opt, batch, step)

    def slots(it, amsgrad):
        return _slots(it, amsgrad) + (probe[it.param] if probe is not None else it.g,
                                      gnb[it.param] if gnb is not None else it.g)

    k = 7 if guard else 4
    parts = []
    for group in dtype_groups(batch, slots, key=lambda it: it.group["amsgrad"]):
        geo = group.geo
        partials = group.partials(k)
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_stats_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(7)), geo.numels, geo.block_tensor,
               geo.block_start, rows, partials if guard else ok_flag(batch), partials, X=group.tl_dtype,
               ACC=group.acc, DECOUPLED=opt.decoupled, AMSGRAD=group.variant, HAS_PROBE=probe is not None,
               HAS_GNB=gnb is not None, HAS_DECAY=_has_decay(group), GUARD=guard, **group.tiling(warps=4))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)


def glyder_adam_apply(opt, batch, step: torch.Tensor, coef: torch.Tensor) -> None:
    moments = opt._pass_a_guards  # pass A committed nothing: m and v are formed and stored here
    table = _table(opt, batch, step)
    for group in dtype_groups(batch, lambda it, amsgrad: _slots(it, amsgrad, grad=moments),
                              key=lambda it: it.group["amsgrad"]):
        geo = group.geo
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_apply_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(5)), geo.numels, geo.block_tensor,
               geo.block_start, rows, group.take(coef), ok_flag(batch), X=group.tl_dtype, ACC=group.acc,
               DECOUPLED=opt.decoupled, AMSGRAD=group.variant, HAS_DECAY=_has_decay(group), MOMENTS=moments,
               **group.tiling(warps=8 if moments else 4), **rounding(batch, group))
