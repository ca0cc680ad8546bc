"""PS-SPS (methods/ps_sps.py) as fused passes.

Coefficients (one program, ``scaling.coefficients``): the step's bias corrections.
Stats pass (R 8: g, v; nothing written): Σ g²/α² per tensor, α from this step's v in registers.
Rule (one program): the accept decision (‖g/α‖² is the non-finite witness), η from ``pssps_rule``, the
store, the counters, and every tensor's coefficient c_t = lr_t · η.
Apply pass (R 16: g, x, v, m; W 12): v, m updated; x ← x − c_t (u + wd x), u = g/α² (or m̂/α²).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrfree.methods import ps_sps as method

from .multi_tensor import program_elements, tensor_ptr
from .rounding import SALT_EXP_AVG, SALT_EXP_AVG_SQ, SALT_MAX_EXP_AVG_SQ, rounding, to_param, to_state
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials
from .scaling import adam_scale, direction
from .scalar_math import accept, column_total, commit, finish, fused, rule_kernel, scale_vector, step_inputs

_RULE = fused(method.pssps_rule)


@triton.jit
def _load_scale(it_g, v_ptr, vmax_ptr, offs, mask, c, BLOCK: tl.constexpr, ACC: tl.constexpr,
                SCALED: tl.constexpr, AMSGRAD: tl.constexpr):
    if SCALED:
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        vmax = v
        if AMSGRAD:
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(ACC)
        v_new, vmax_new, alpha_sq, _ = adam_scale(it_g, v, vmax, c, ACC, AMSGRAD)
    else:
        v_new = tl.zeros([BLOCK], ACC)
        vmax_new = v_new
        alpha_sq = tl.full([BLOCK], 1.0, ACC)
    return v_new, vmax_new, alpha_sq


@triton.jit
def _stats_kernel(g_ptrs, v_ptrs, vmax_ptrs, numels, block_tensor, block_start, c, partials, X: tl.constexpr,
                  ACC: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr, AMSGRAD: tl.constexpr, BLOCK: tl.constexpr,
                  ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    _, _, alpha_sq = _load_scale(g, tensor_ptr(v_ptrs, t, S, ALIGNED),
                                 tensor_ptr(vmax_ptrs, t, S, ALIGNED), offs, mask, c, BLOCK, ACC,
                                 SCALED, AMSGRAD)
    tl.store(partials + pid, tl.sum(g * g / alpha_sq, axis=0))


@rule_kernel
def _rule_kernel(scaled_sq, n, h, lr, coef, step_size, smooth_ref, scaled_grad_norm, loss, found_inf, ok_out, steps,
                 skipped, RULE: tl.constexpr, SMOOTH: tl.constexpr, CAPPED: tl.constexpr, GUARD: tl.constexpr,
                 HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """PS-SPS's step in one program: accept, η from the rule, the store, the counters, and coef_i = lr_i · η."""
    total = column_total(scaled_sq, n, 0, 1)
    ok = accept(total, loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    eta, ref, norm = RULE(tl.load(loss).to(tl.float64), total, tl.load(smooth_ref), h, SMOOTH, CAPPED)
    commit(step_size, eta, ok)
    commit(smooth_ref, ref, ok)
    commit(scaled_grad_norm, norm, ok)
    finish(ok, ok, ok_out, steps, skipped)
    scale_vector(coef, lr, n, eta)


@triton.jit
def _apply_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, numels, block_tensor, block_start, c, coef, decay_vec,
                  ok, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr,
                  AMSGRAD: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr,
                  ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
    vmax_ptr = tensor_ptr(vmax_ptrs, t, S, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    v_new, vmax_new, alpha_sq = _load_scale(g, v_ptr, vmax_ptr, offs, mask, c, BLOCK, ACC, SCALED, AMSGRAD)
    if SCALED:
        tl.store(v_ptr + offs, to_state(v_new, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=mask)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, to_state(vmax_new, S, sr_seeds, t, offs, SALT_MAX_EXP_AVG_SQ), mask=mask)
    m = tl.zeros([BLOCK], ACC)
    if HAS_M:
        m = tl.load(m_ptr + offs, mask=mask).to(ACC)
    m_new, u = direction(g, m, alpha_sq, c, ACC, HAS_M)
    if HAS_M:
        tl.store(m_ptr + offs, to_state(m_new, S, sr_seeds, t, offs, SALT_EXP_AVG), mask=mask)
    u = u + tl.load(decay_vec + t).to(ACC) * x
    tl.store(x_ptr + offs, to_param(x - tl.load(coef + t).to(ACC) * u, X, SR, sr_seeds, t, offs), mask=mask)


def _slots(it):
    st = it.state
    v = st.get("exp_avg_sq", it.g)
    return (it.p, it.g, st.get("exp_avg", v), v, st.get("max_exp_avg_sq", v))


def _flags(hp):
    return dict(SCALED=hp["scaling"] == "adam", AMSGRAD=hp["amsgrad"] and hp["scaling"] == "adam")


def pssps_stats(opt, batch, c: torch.Tensor) -> torch.Tensor:
    hp = opt.param_groups[0]
    parts = []
    for group in dtype_groups(batch, _slots):
        geo = group.geo
        partials = group.partials(1)
        launch(_stats_kernel, (geo.n_blocks,), geo.slot(1), geo.slot(3), geo.slot(4), geo.numels, geo.block_tensor,
               geo.block_start, c, partials, X=group.tl_dtype, ACC=group.acc, S=group.state_tl,
               **group.tiling(warps=4), **_flags(hp))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)


def pssps_apply(opt, batch, c: torch.Tensor, coef: torch.Tensor) -> None:
    hp = opt.param_groups[0]
    decay = batch.per_item("weight_decay")
    for group in dtype_groups(batch, _slots):
        geo = group.geo
        launch(_apply_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(5)), geo.numels, geo.block_tensor,
               geo.block_start, c, group.take(coef), group.take(decay), ok_flag(batch), X=group.tl_dtype,
               ACC=group.acc, HAS_M=hp["betas"][0] > 0, **group.tiling(warps=4), **_flags(hp),
               **rounding(batch, group, state=True))


def pssps_rule(opt, batch, scaled_sq: torch.Tensor) -> torch.Tensor:
    """The rule kernel on the step's per-tensor ‖g/α‖² (items,); returns every tensor's coefficient lr_t · η
    (and sets the accept flag the apply pass reads)."""
    S = opt.S
    h, smooth, capped = opt._rule_hyperparameters()
    coef = torch.empty(len(batch.items), dtype=torch.float64, device=batch.device)
    launch(_rule_kernel, (1,), scaled_sq, len(batch.items), batch.vector(h), batch.per_item("lr"), coef,
           S["step_size"], S["smooth_ref"], S["scaled_grad_norm"], RULE=_RULE, SMOOTH=smooth, CAPPED=capped,
           **step_inputs(batch))
    return coef
