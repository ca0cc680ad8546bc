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

Both passes read every tensor's row of one table (β1, 1−β1, β2, 1−β2, ε, wd, 1/(1−β1^t), 1/√(1−β2^t)),
written once per step by a one-program launch (``_table_kernel``) from the step counts in the store. Single-
process, the step-size rule runs between the passes as the rule kernel ``glyder_rule`` (with the accept
decision, the counters and the new step counts), so a step is: the table, A, its reduction, the rule, B.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .adam import adam_moments
from .multi_tensor import program_elements, tensor_ptr
from .rounding import SALT_EXP_AVG, SALT_EXP_AVG_SQ, SALT_MAX_EXP_AVG_SQ, rounding, to_param, to_state
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials
from .scalar_math import LANES, accept, column_total, commit, finish, fused, rule_kernel, step_inputs

# pass A's statistics columns (lrfree.glyder: NUMERATOR, DIR_SQ, GNB; GRAD_SQ, GNB_SQ, PROBE_SQ under GUARD)
INNER: tl.constexpr = tl.constexpr(0)
DIR_SQ: tl.constexpr = tl.constexpr(1)
GNB_DOT: tl.constexpr = tl.constexpr(2)
GRAD_SQ: tl.constexpr = tl.constexpr(4)
GNB_SQ: tl.constexpr = tl.constexpr(5)
PROBE_SQ: tl.constexpr = tl.constexpr(6)
# the table: CONSTANT columns from the param groups, then the bias corrections
CONSTANT: tl.constexpr = tl.constexpr(6)
COLUMNS: tl.constexpr = tl.constexpr(8)


@triton.jit
def _direction(m, v, x, row, ACC: tl.constexpr, DECOUPLED: tl.constexpr):
    # row: (β1, 1−β1, β2, 1−β2, ε, wd, 1/(1−β1^t), 1/√(1−β2^t))
    d = (m * tl.load(row + 6).to(ACC)) / (tl.sqrt(v) * tl.load(row + 7).to(ACC) + tl.load(row + 4).to(ACC))
    if DECOUPLED:
        d = d + tl.load(row + 5).to(ACC) * x
    return d


@triton.jit
def _stats_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, a_ptrs, gnb_ptrs, numels, block_tensor, block_start,
                  table, ok, partials, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr,
                  DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_PROBE: tl.constexpr, HAS_GNB: tl.constexpr,
                  HAS_DECAY: tl.constexpr, GUARD: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Partials per block: ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩, and under GUARD Σg², Σĝ², Σa² (columns K = 7; else K
    = 4 and m, v are stored where the step is accepted)."""
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    row = table + 8 * t
    if GUARD:
        out = partials + 7 * pid
    else:
        out = partials + 4 * pid
    m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    if GUARD:  # the gradient as given: the guard's Σg²
        tl.store(out + 4, tl.sum(g * g, axis=0))
    x = tl.zeros([BLOCK], dtype=ACC)
    if HAS_DECAY:  # x enters pass A only through weight decay: without it, it is not read
        x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if not DECOUPLED:
            g = g + tl.load(row + 5).to(ACC) * x
    m, v = adam_moments(tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC),
                        tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC), g, row, ACC)
    if not GUARD:
        accept = mask & ((tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0)
        tl.store(m_ptr + offs, to_state(m, S, sr_seeds, t, offs, SALT_EXP_AVG), mask=accept)
        tl.store(v_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=accept)
    if AMSGRAD:
        vmax_ptr = tensor_ptr(vmax_ptrs, t, S, ALIGNED)
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(ACC), v)
        if not GUARD:
            tl.store(vmax_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_MAX_EXP_AVG_SQ), mask=accept)
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
                  sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr, DECOUPLED: tl.constexpr,
                  AMSGRAD: tl.constexpr, HAS_DECAY: tl.constexpr, MOMENTS: tl.constexpr, SR: tl.constexpr,
                  BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """x ← x − c·d; under MOMENTS (pass A committed nothing) m and v are formed from g here, as pass A formed
    them, and stored; else they are read as pass A stored them. Either way d is formed from m and v as
    stored (rounded, in bf16 state), as the reference forms it from the state it committed."""
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    row = table + 8 * t
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
    vmax_ptr = tensor_ptr(vmax_ptrs, t, S, ALIGNED)
    if MOMENTS and HAS_DECAY and not DECOUPLED:  # coupled weight decay: x enters the moments
        x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    if MOMENTS:
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
        if HAS_DECAY and not DECOUPLED:
            g = g + tl.load(row + 5).to(ACC) * x
        m, v = adam_moments(tl.load(m_ptr + offs, mask=mask).to(ACC), tl.load(v_ptr + offs, mask=mask).to(ACC), g,
                            row, ACC)
        m = to_state(m, S, sr_seeds, t, offs, SALT_EXP_AVG)
        tl.store(m_ptr + offs, m, mask=mask)
        m = m.to(ACC)
        if AMSGRAD:
            tl.store(v_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=mask)
            v = to_state(tl.maximum(tl.load(vmax_ptr + offs, mask=mask).to(ACC), v), S, sr_seeds, t, offs,
                         SALT_MAX_EXP_AVG_SQ)
            tl.store(vmax_ptr + offs, v, mask=mask)
        else:
            v = to_state(v, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ)
            tl.store(v_ptr + offs, v, mask=mask)
        v = v.to(ACC)
    else:
        m = tl.load(m_ptr + offs, mask=mask).to(ACC)
        if AMSGRAD:
            v = tl.load(vmax_ptr + offs, mask=mask).to(ACC)
        else:
            v = tl.load(v_ptr + offs, mask=mask).to(ACC)
    if not (MOMENTS and HAS_DECAY and not DECOUPLED):  # x loaded late: fewer registers live across the moments
        x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    d = _direction(m, v, x, row, ACC, DECOUPLED)
    tl.store(x_ptr + offs, to_param(x - tl.load(coef + t).to(ACC) * d, X, SR, sr_seeds, t, offs), mask=mask)


@rule_kernel
def _table_kernel(const, flat, step_counts, table, n, BIAS: tl.constexpr):
    """Row i of the passes' table: row i of ``const`` (β1, 1−β1, β2, 1−β2, ε, wd) and the bias corrections
    (the method's ``adam_bias_corrections``) at this step's t = step_counts[flat[i]] + 1."""
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        src = const + CONSTANT * idx
        dst = table + COLUMNS * idx
        for c in tl.static_range(CONSTANT):
            tl.store(dst + c, tl.load(src + c, mask=inside, other=0.0), mask=inside)
        t = tl.load(step_counts + tl.load(flat + idx, mask=inside, other=0), mask=inside, other=0.0) + 1.0
        # lanes past the end: any β in (0, 1) (their results are not stored; log 0 would warn in the interpreter)
        bc1, bc2 = BIAS(t, tl.load(src, mask=inside, other=0.5), tl.load(src + 2, mask=inside, other=0.5))
        tl.store(dst + CONSTANT, bc1, mask=inside)
        tl.store(dst + CONSTANT + 1, bc2, mask=inside)
        i0 += LANES


_FUSED: dict = {}


def _fused(fn):
    kernel_fn = _FUSED.get(fn)
    if kernel_fn is None:
        kernel_fn = _FUSED[fn] = fused(fn)
    return kernel_fn


def _table(opt, batch) -> torch.Tensor:
    """(items, COLUMNS) fp64: the step's table, formed once per step, before any step count changes (pass B
    reuses pass A's)."""
    table = batch.__dict__.get("_glyder_table")
    if table is None:
        n = len(batch.items)
        const = batch.vector(v for it in batch.items for v in (
            it.group["betas"][0], 1 - it.group["betas"][0], it.group["betas"][1], 1 - it.group["betas"][1],
            it.group["eps"], it.group["weight_decay"]))
        table = batch._glyder_table = torch.empty((n, COLUMNS.value), dtype=torch.float64, device=batch.device)
        launch(_table_kernel, (1,), const, batch.index(it.flat_index for it in batch.items), opt.S["step"], table, n,
               BIAS=_fused(type(opt).bias_corrections))
    return table


def _commit_flag(batch) -> torch.Tensor:
    """The flag pass A stores m and v under when it is not the guard. The rule kernel decides the step after
    A, but without the guard only GradScaler's found-inf rejects it (``scalar_math.accept``), which is known
    before A."""
    if not batch.rule_kernel:
        return ok_flag(batch)
    if batch.found_inf is None:
        return batch.optimizer._coefficient_vector((1,), torch.int32)
    return (batch.found_inf == 0).to(torch.int32)


def _slots(it, amsgrad: bool, grad: bool = True) -> tuple:
    """x, g, m, v, v̂max: the streams both passes share (g only where read; v twice without amsgrad)."""
    st = it.state
    return (it.p, it.g if grad else it.p, st["exp_avg"], st["exp_avg_sq"],
            st["max_exp_avg_sq"] if amsgrad else st["exp_avg_sq"])


def _has_decay(group) -> bool:
    return any(it.group["weight_decay"] != 0 for it in group.items)


def glyder_adam_stats(opt, batch, step, probe: dict | None, gnb: dict | None) -> torch.Tensor:
    """(items, 4) fp64: ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩ per tensor, m and v updated where the step is accepted;
    or, when pass A is the guard, (items, 7) with Σg², Σĝ², Σa² after them and nothing written. ``step``
    (the reference's step counts) is not read: the table forms them from the store."""
    guard = opt._pass_a_guards
    table = _table(opt, batch)

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
               geo.block_start, rows, partials if guard else _commit_flag(batch), partials, X=group.tl_dtype,
               ACC=group.acc, DECOUPLED=opt.decoupled, AMSGRAD=group.variant, HAS_PROBE=probe is not None,
               HAS_GNB=gnb is not None, HAS_DECAY=_has_decay(group), GUARD=guard, **group.tiling(warps=4),
               **rounding(batch, group, params=False, state=True))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)


def glyder_adam_apply(opt, batch, step, coef: torch.Tensor) -> None:
    """x ← x − coef·d (``step``: as in glyder_adam_stats, not read)."""
    moments = opt._pass_a_guards  # pass A committed nothing: m and v are formed and stored here
    table = _table(opt, batch)
    for group in dtype_groups(batch, lambda it, amsgrad: _slots(it, amsgrad, grad=moments),
                              key=lambda it: it.group["amsgrad"]):
        geo = group.geo
        rows = table if group.whole else table.index_select(0, group._indices())
        launch(_apply_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(5)), geo.numels, geo.block_tensor,
               geo.block_start, rows, group.take(coef), ok_flag(batch), X=group.tl_dtype, ACC=group.acc,
               DECOUPLED=opt.decoupled, AMSGRAD=group.variant, HAS_DECAY=_has_decay(group), MOMENTS=moments,
               **group.tiling(warps=8 if moments else 4), **rounding(batch, group, state=True))


@rule_kernel
def _glyder_rule_kernel(stats, n, h, lr, flat, step_counts, coef, numerator, curvature, step_size, dir_norm, cap,
                        capped, skips, loss, found_inf, ok_out, steps, skipped, RULE: tl.constexpr, K: tl.constexpr,
                        CURVATURE: tl.constexpr, CAPPED: tl.constexpr, GUARD: tl.constexpr, HAS_LOSS: tl.constexpr,
                        HAS_FOUND_INF: tl.constexpr):
    """GLyDER's step in one program: accept (under GUARD the witness is Σ of pass A's Σg², Σĝ², Σa² columns),
    the method's rule on the column totals, the store, the counters, and for each of the n tensors its
    coefficient lr_i·η and its step count store[flat[i]] + 1 (committed if accepted)."""
    inner = column_total(stats, n, INNER, K)
    if GUARD:
        witness = column_total(stats, n, GRAD_SQ, K) + column_total(stats, n, GNB_SQ, K) + \
            column_total(stats, n, PROBE_SQ, K)
    else:
        witness = inner  # not read: accept() decides from GradScaler's flag alone
    ok = accept(witness, loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    numerator_new, curvature_new, eta, dir_norm_new, cap_new, capped_new, skips_new = RULE(
        inner, column_total(stats, n, DIR_SQ, K), column_total(stats, n, GNB_DOT, K), 0.0, tl.load(numerator),
        tl.load(curvature), tl.load(step_size), tl.load(cap), tl.load(capped), tl.load(skips), h, CURVATURE, CAPPED)
    commit(numerator, numerator_new, ok)
    commit(curvature, curvature_new, ok)
    commit(step_size, eta, ok)
    commit(dir_norm, dir_norm_new, ok)
    commit(cap, cap_new, ok)
    commit(capped, capped_new, ok)
    commit(skips, skips_new, ok)
    finish(ok, ok, ok_out, steps, skipped)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        tl.store(coef + idx, tl.load(lr + idx, mask=inside, other=0.0) * eta, mask=inside)
        k = tl.load(flat + idx, mask=inside, other=0)
        t = tl.load(step_counts + k, mask=inside, other=0.0)
        tl.store(step_counts + k, tl.where(ok, t + 1.0, t), mask=inside)
        i0 += LANES


def glyder_rule(opt, batch, stats: torch.Tensor) -> torch.Tensor:
    """Launch GLyDER's rule kernel on pass A's (items, K) statistics; returns every tensor's coefficient
    lr_i·η (fp64) for pass B."""
    S = opt.S
    n = len(batch.items)
    coef = torch.empty(n, dtype=torch.float64, device=batch.device)
    curvature, capped = opt._rule_flags()
    launch(_glyder_rule_kernel, (1,), stats, n, opt._coefficient_vector(opt._rule_hyperparameters()),
           batch.per_item("lr"), batch.index(it.flat_index for it in batch.items), S["step"], coef, S["numerator"],
           S["curvature"], S["step_size"], S["dir_norm"], S["step_size_cap"], S["capped"], S["curvature_skips"],
           RULE=_fused(type(opt).rule), K=stats.shape[1], CURVATURE=curvature, CAPPED=capped, **step_inputs(batch))
    return coef
