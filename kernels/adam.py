"""Adam / AdamW in one pass, torch.optim semantics, per-tensor step counts (R 16: g, x, m, v; W 12):

    g ← ±g (+ wd x, Adam);  x ← x (1 − lr wd) (AdamW);  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²
    (amsgrad: v̂ ← max(v̂, v));  x ← x − (lr / bc1) m / (√v / √bc2 + ε)

Per-tensor lr, betas, eps, wd and bias corrections arrive as an fp64 table, one row per tensor; the
complements 1 − β are formed in fp64 (in fp32, 1 − 0.999 loses four digits). Single-process, the table's
step-dependent columns (lr / bc1, √bc2) are formed by the rule kernel ``_adam_rule_kernel`` from the
tensors' step counts in the scalar store, together with the accept decision, the counters and the new
step counts: a step is the guard's Σg² pass and its reduction, the rule kernel and the apply pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import SALT_EXP_AVG, SALT_EXP_AVG_SQ, SALT_MAX_EXP_AVG_SQ, rounding, to_param, to_state
from .common import dtype_groups, launch, ok_flag
from .scalar_math import LANES, accept, column_total, finish, fused, rule_kernel, step_inputs

# the table's columns: (β1, 1−β1, β2, 1−β2, eps, wd, 1 − lr·wd, step size lr/bc1, √bc2, sign); the two
# step-dependent ones are formed by the rule
COLUMNS = tl.constexpr(10)
STEP_SIZE = tl.constexpr(7)
BC2_SQRT = tl.constexpr(8)


@triton.jit
def adam_moments(m, v, g, row, ACC: tl.constexpr):
    """The new first and second moments from the stored ones and the gradient; ``row`` starts with the
    tensor's (β1, 1−β1, β2, 1−β2). Shared with GLyDER's Adam direction (kernels/glyder.py)."""
    m = tl.load(row).to(ACC) * m + tl.load(row + 1).to(ACC) * g
    v = tl.load(row + 2).to(ACC) * v + tl.load(row + 3).to(ACC) * g * g
    return m, v


@triton.jit
def _adam_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, numels, block_tensor, block_start, table, ok,
                 sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr, DECOUPLED: tl.constexpr,
                 AMSGRAD: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    # per tensor: (β1, 1−β1, β2, 1−β2, eps, wd, 1 − lr·wd, step size lr/bc1, √bc2, sign)
    row = table + 10 * t
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC) * tl.load(row + 9).to(ACC)
    if DECOUPLED:
        x = x * tl.load(row + 6).to(ACC)
    else:
        g = g + tl.load(row + 5).to(ACC) * x
    m, v = adam_moments(tl.load(m_ptr + offs, mask=mask).to(ACC), tl.load(v_ptr + offs, mask=mask).to(ACC), g, row,
                        ACC)
    tl.store(m_ptr + offs, to_state(m, S, sr_seeds, t, offs, SALT_EXP_AVG), mask=mask)
    tl.store(v_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=mask)
    if AMSGRAD:
        vmax_ptr = tensor_ptr(vmax_ptrs, t, S, ALIGNED)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(ACC), v)
        tl.store(vmax_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_MAX_EXP_AVG_SQ), mask=mask)
    denom = tl.sqrt(v) / tl.load(row + 8).to(ACC) + tl.load(row + 4).to(ACC)
    tl.store(x_ptr + offs, to_param(x - tl.load(row + 7).to(ACC) * (m / denom), X, SR, sr_seeds, t, offs), mask=mask)


@rule_kernel
def _adam_rule_kernel(grad_sq, n_stats, n, flat, step_store, const, table, loss, found_inf, ok_out, steps, skipped,
                      RULE: tl.constexpr, GUARD: tl.constexpr, HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Adam's step in one program: accept (the witness: Σ of the ``n_stats`` per-tensor Σg²), the
    counters, and for every one of the ``n`` tensors its step count t = store[flat[i]] + 1 (committed if
    accepted) and its table row: ``const``'s row with columns STEP_SIZE and BC2_SQRT (lr there) replaced
    by the method's rule (lr / bc1, √bc2)."""
    total = column_total(grad_sq, n_stats, 0, 1)
    ok = accept(total, loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    finish(ok, ok, ok_out, steps, skipped)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        k = tl.load(flat + idx, mask=inside, other=0)
        old = tl.load(step_store + k, mask=inside, other=0.0)
        t = old + 1.0
        row = const + idx * COLUMNS
        beta1 = tl.load(row, mask=inside, other=0.5)
        beta2 = tl.load(row + 2, mask=inside, other=0.5)
        lr = tl.load(row + STEP_SIZE, mask=inside, other=0.0)
        step_size, bc2_sqrt = RULE(t, lr, beta1, beta2)
        for c in tl.static_range(COLUMNS):
            if c == STEP_SIZE:
                value = step_size
            elif c == BC2_SQRT:
                value = bc2_sqrt
            else:
                value = tl.load(row + c, mask=inside, other=0.0)
            tl.store(table + idx * COLUMNS + c, value, mask=inside)
        tl.store(step_store + k, tl.where(ok, t, old), mask=inside)
        i0 += LANES


_FUSED_RULE = []


def adam_rule(opt, batch) -> torch.Tensor:
    """Launch Adam's rule kernel; returns the step's (items, COLUMNS) table. The store's step counts
    and counters are updated and the accept flag written (``batch.ok_i32``) in the same launch."""
    from lrfree.methods.adam import adam_bias_rule
    if not _FUSED_RULE:
        _FUSED_RULE.append(fused(adam_bias_rule))
    S = opt.S
    n = len(batch.items)
    const = batch.vector(v for it in batch.items for v in _const_row(it.group))
    table = torch.empty((n, COLUMNS.value), dtype=torch.float64, device=batch.device)
    # the guard's witness; without the guard nothing reads it (no Σg² pass at all)
    grad_sq = batch.local_grad_sq if opt.skip_nonfinite else S["steps"]
    launch(_adam_rule_kernel, (1,), grad_sq, n if opt.skip_nonfinite else 0, n,
           batch.index(it.flat_index for it in batch.items), S["step"], const, table, RULE=_FUSED_RULE[0],
           **step_inputs(batch))
    return table


def _const_row(group) -> tuple[float, ...]:
    """A tensor's host coefficients as a table row, lr in the STEP_SIZE column and 0 in BC2_SQRT: the rule's
    input (host floats in fp64, as torch.optim forms them; a device vector cached by value)."""
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    return (beta1, 1 - beta1, beta2, 1 - beta2, group["eps"], wd, 1 - lr * wd, lr, 0.0,
            -1.0 if group["maximize"] else 1.0)


def adam_step(opt, batch, step: torch.Tensor | None = None) -> None:
    """``step``: (items,) fp64 step counts t (this step included); None: the step's rule kernel forms
    the table (``adam_rule``: the accept decision, the counters and the new step counts included)."""
    table = adam_rule(opt, batch) if step is None else _table(batch, step)

    def slots(it, amsgrad):
        st = it.state
        return (it.p, it.g, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"])

    for group in dtype_groups(batch, slots, key=lambda it: it.group["amsgrad"]):
        geo = group.geo
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_adam_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(5)), geo.numels, geo.block_tensor,
               geo.block_start, rows, ok_flag(batch), X=group.tl_dtype, ACC=group.acc, DECOUPLED=opt.decoupled,
               AMSGRAD=group.variant, **group.tiling(warps=4), **rounding(batch, group, state=True))


def _table(batch, step: torch.Tensor) -> torch.Tensor:
    """The table from the step counts ``step`` with torch ops: the same rule, run in torch where the step
    has no rule kernel (data parallel, where the accept decision waits for the step's collective)."""
    from lrfree.methods.adam import adam_bias_rule
    const = batch.vector(v for it in batch.items for v in _const_row(it.group)).view(-1, COLUMNS.value)
    step_size, bc2_sqrt = adam_bias_rule(step, const[:, STEP_SIZE.value], const[:, 0], const[:, 2])
    return torch.cat([const[:, :STEP_SIZE.value], step_size[:, None], bc2_sqrt[:, None],
                      const[:, BC2_SQRT.value + 1:]], 1)
