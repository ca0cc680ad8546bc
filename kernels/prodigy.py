"""Prodigy (ALGORITHMS §4.7): a rule kernel, pass A, a rule kernel, pass B (the update needs the new d
inside ε).

The first rule kernel decides the step (``_dadapt``) and forms λ_k = d_k γ bc_k (``adam_step_size`` of
methods/_dadapt.py) and the coefficients of the passes below (d-dependent ones in fp64).
Pass A (lr > 0 tensors), with J the elements whose flat index is a multiple of the tensor's slice_p:
    g ← g + wd x (coupled);   ⟨g_J, p0 − x_J⟩;   m ← β1 m + d(1−β1) g;   v ← β2 v + d²(1−β2) g²;
    s ← β3 s + c_s g_J;   ‖s‖₁                                   R 24 (g, x, p0, s, m, v)  W 12
The second rule kernel reduces pass A's statistics (ΔR = Σ (d/d0_t) λ_k ⟨g_J, p0 − x_J⟩_t, S1 = Σ ‖s‖₁_t),
runs ``prodigy_rule`` and commits the store, d_{k+1} included.
Pass B, with λ_t = c_t λ_k (the tensor's group lr ratio times the shared step, an fp64 per-tensor vector):
    x ← x − wd λ_t x (decoupled);  x ← x − λ_t m / (√v + d_new ε)   (β1 = 0: λ_t d_new g / (...))   R 12  W 4
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lrfree.methods._dadapt import adam_step_size as _step_size_rule
from lrfree.methods.prodigy import prodigy_rule as _rule

from .multi_tensor import program_elements, tensor_ptr
from .rounding import SALT_EXP_AVG, SALT_EXP_AVG_SQ, SALT_S, rounding, to_param, to_state
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials
from .scalar_math import LANES, column_total, commit, fused, rule_kernel
from ._dadapt import count_step, decide, decision_inputs

STEP_SIZE = fused(_step_size_rule)
RULE = fused(_rule)


@rule_kernel
def _prodigy_step_size_kernel(h, d_ptr, steps, ratios, d0s, safeguard, n, dlr_out, moments, s_coef, steps_out,
                              witness, n_witness, loss, found_inf, ok_out, skipped, total_steps,
                              BIAS_CORRECTION: tl.constexpr, GUARD: tl.constexpr, HAS_LOSS: tl.constexpr,
                              HAS_FOUND_INF: tl.constexpr, DECIDE: tl.constexpr, COUNT_TOTAL: tl.constexpr):
    """Accept; λ_k (``dlr_out``); pass A's (β1, d(1−β1), β2, d²(1−β2), β3) (``moments``) and every tensor's
    s coefficient (d/d0_t)·w_t·c_t (w = d under safeguard_warmup, else λ_k); pass B's steps c_t λ_k.
    h = (γ, β1, β2, β3, d_coef, growth rate, the d0 of d's first rise)."""
    decide(witness, n_witness, loss, found_inf, ok_out, skipped, total_steps, GUARD, HAS_LOSS, HAS_FOUND_INF,
           DECIDE, COUNT_TOTAL)
    d = tl.load(d_ptr)
    beta1 = tl.load(h + 1)
    beta2 = tl.load(h + 2)
    dlr = STEP_SIZE(d, tl.load(h), tl.load(steps), beta1, beta2, BIAS_CORRECTION)
    tl.store(dlr_out, dlr)
    tl.store(moments, beta1)
    tl.store(moments + 1, d * (1 - beta1))
    tl.store(moments + 2, beta2)
    tl.store(moments + 3, d * d * (1 - beta2))
    tl.store(moments + 4, tl.load(h + 3))
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        c = tl.load(ratios + idx, mask=inside, other=0.0)
        weight = tl.where(tl.load(safeguard + idx, mask=inside, other=0.0) != 0, d, dlr)
        tl.store(s_coef + idx, (d / tl.load(d0s + idx, mask=inside, other=1.0)) * weight * c, mask=inside)
        tl.store(steps_out + idx, dlr * c, mask=inside)
        i0 += LANES


@rule_kernel
def _prodigy_distance_kernel(stats, n, d0s, h, dlr_ptr, d, d_max, d_hat, numerator, denominator, step_size,
                             ok_out, proceed_out, steps, ADAPT: tl.constexpr):
    """ΔR = Σ (d/d0_t) λ_k ⟨g_J, p0 − x_J⟩_t and S1 = Σ ‖s‖₁_t from pass A's (n, 2) statistics; R, d̂, d_max
    and d_{k+1} from ``prodigy_rule``; the store committed where the step is accepted and S1 > 0, which
    ``steps`` counts and ``proceed_out`` (int32) tells pass B."""
    dlr = tl.load(dlr_ptr)
    d_old = tl.load(d)
    acc = tl.zeros((LANES,), dtype=tl.float64)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        weight = (d_old / tl.load(d0s + idx, mask=inside, other=1.0)) * dlr
        acc += weight * tl.load(stats + idx * 2, mask=inside, other=0.0)
        i0 += LANES
    s_l1 = column_total(stats, n, 1, 2)
    total, hat, top, d_next, estimable = RULE(d_old, tl.load(d_max), tl.load(d_hat), tl.load(numerator),
                                              tl.sum(acc, axis=0), s_l1, tl.load(h + 6), tl.load(h + 3),
                                              tl.load(h + 4), tl.load(h + 5), ADAPT)
    proceed = (tl.load(ok_out) != 0) & estimable
    commit(numerator, total, proceed)
    commit(denominator, s_l1, proceed)
    commit(d_hat, hat, proceed)
    commit(d_max, top, proceed)
    commit(d, d_next, proceed)
    commit(step_size, dlr, proceed)
    tl.store(proceed_out, proceed.to(tl.int32))
    count_step(steps, proceed)


@dataclass
class Coefficients:
    """What the first rule kernel forms for the passes: λ_k (one element), pass A's moment coefficients
    (β1, d(1−β1), β2, d²(1−β2), β3) and every tensor's s coefficient, and pass B's steps c_t λ_k."""

    dlr: torch.Tensor
    moments: torch.Tensor
    s_coef: torch.Tensor
    steps: torch.Tensor


def prodigy_step_size(opt, batch, lr: float, ratios: list[float]) -> Coefficients:
    """The first rule kernel: decides the step and forms the passes' coefficients."""
    S = opt.S
    n = len(batch.items)
    f64 = dict(dtype=torch.float64, device=batch.device)
    out = Coefficients(torch.empty(1, **f64), torch.empty(5, **f64), torch.empty(n, **f64), torch.empty(n, **f64))
    launch(_prodigy_step_size_kernel, (1,), _hyperparameters(opt, batch, lr), S["d"], S["steps"],
           batch.vector(ratios), batch.per_item("d0"), batch.per_item("safeguard_warmup"), n, out.dlr, out.moments,
           out.s_coef, out.steps, BIAS_CORRECTION=opt.rule_group()["use_bias_correction"],
           **decision_inputs(opt, batch))
    return out


def prodigy_distance(opt, batch, lr: float, stats: torch.Tensor, coefficients: Coefficients) -> torch.Tensor:
    """The second rule kernel, on pass A's (items, 2) statistics; returns pass B's flag (int32: the step is
    accepted and S1 > 0)."""
    S = opt.S
    proceed = torch.empty((), dtype=torch.int32, device=batch.device)
    launch(_prodigy_distance_kernel, (1,), stats, stats.shape[0], batch.per_item("d0"),
           _hyperparameters(opt, batch, lr), coefficients.dlr, S["d"], S["d_max"], S["d_hat"], S["numerator"],
           S["denominator"], S["step_size"], ok_flag(batch), proceed, S["steps"], ADAPT=lr > 0,
           num_warps=8)  # two 1024-lane fp64 sums: at 4 warps Triton 3.6 spills them on sm_90
    return proceed


def _hyperparameters(opt, batch, lr: float) -> torch.Tensor:
    """(γ, β1, β2, β3, d_coef, growth rate, the d0 of d's first rise): what the rules read, one cached vector."""
    hp = opt.rule_group()
    return batch.vector((lr, *hp["betas"], opt._beta3(), hp["d_coef"], hp["growth_rate"], opt._first_rise_d0()))


@triton.jit
def _prodigy_stats_kernel(x_ptrs, g_ptrs, p0_ptrs, s_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start,
                          slice_vec, decay_vec, s_coef_vec, coeffs, ok, partials, sr_seeds, X: tl.constexpr,
                          ACC: tl.constexpr, S: tl.constexpr, COUPLED: tl.constexpr, HAS_M: tl.constexpr,
                          SLICED: tl.constexpr,
                          BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    accept = (tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0
    x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    if COUPLED:
        g = g + tl.load(decay_vec + t).to(ACC) * x
    # (β1, d(1−β1), β2, d²(1−β2), β3): d-dependent coefficients are formed on device in fp64
    if HAS_M:
        m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
        m = (tl.load(coeffs).to(ACC) * tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC)
             + tl.load(coeffs + 1).to(ACC) * g)
        tl.store(m_ptr + offs, to_state(m, S, sr_seeds, t, offs, SALT_EXP_AVG), mask=mask & accept)
    v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
    v = (tl.load(coeffs + 2).to(ACC) * tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
         + tl.load(coeffs + 3).to(ACC) * g * g)
    tl.store(v_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=mask & accept)
    if SLICED:  # s and p0 keep every slice_p-th element: 64-bit division per element, so only when needed
        stride = tl.load(slice_vec + t)
        sliced = mask & (offs % stride == 0)
        j = offs // stride
    else:
        sliced = mask
        j = offs
    p0 = tl.load(tensor_ptr(p0_ptrs, t, X, ALIGNED) + j, mask=sliced, other=0.0).to(ACC)
    s_ptr = tensor_ptr(s_ptrs, t, S, ALIGNED)
    s = (tl.load(coeffs + 4).to(ACC) * tl.load(s_ptr + j, mask=sliced, other=0.0).to(ACC)
         + tl.load(s_coef_vec + t).to(ACC) * g)
    s = tl.where(sliced, s, 0.0)
    tl.store(s_ptr + j, to_state(s, S, sr_seeds, t, j, SALT_S), mask=sliced & accept)
    tl.store(partials + 2 * pid, tl.sum(tl.where(sliced, g * (p0 - x), 0.0), axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum(tl.abs(s), axis=0))


@triton.jit
def _prodigy_apply_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, decay_vec, eps_vec,
                          dlr_ptr, d_new_ptr, proceed, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr,
                          COUPLED: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr,
                          ALIGNED: tl.constexpr):
    if tl.load(proceed) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    dlr = tl.load(dlr_ptr + t).to(ACC)
    d_new = tl.load(d_new_ptr).to(ACC)
    decay = tl.load(decay_vec + t).to(ACC)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    denom = tl.sqrt(tl.load(tensor_ptr(v_ptrs, t, S, ALIGNED) + offs, mask=mask).to(ACC)) \
        + d_new * tl.load(eps_vec + t).to(ACC)
    if HAS_M:
        step = dlr * tl.load(tensor_ptr(m_ptrs, t, S, ALIGNED) + offs, mask=mask).to(ACC) / denom
    else:
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
        if COUPLED:
            g = g + decay * x
        step = dlr * d_new * g / denom
    if not COUPLED:
        x = x - decay * dlr * x
    tl.store(x_ptr + offs, to_param(x - step, X, SR, sr_seeds, t, offs), mask=mask)


def _slots(it):
    st = it.state
    return (it.p, it.g, st["p0"], st["s"], st.get("exp_avg", st["exp_avg_sq"]), st["exp_avg_sq"])


def prodigy_stats(opt, batch, d: torch.Tensor, dlr: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Pass A with its coefficients formed by torch ops from d and λ (the torch rule's path)."""
    hp = opt.rule_group()
    beta1, beta2 = hp["betas"]
    moments = torch.stack([torch.full_like(d, beta1), d * (1 - beta1), torch.full_like(d, beta2),
                           d * d * (1 - beta2), torch.full_like(d, opt._beta3())])
    weight = torch.where(batch.vector(float(it.group["safeguard_warmup"]) for it in batch.items) != 0, d, dlr)
    s_coef = (d / batch.per_item("d0")) * weight * ratios  # × c: s sees the reparametrized gradient c·g
    return _stats(opt, batch, moments, s_coef)


def prodigy_rule_stats(opt, batch, coefficients: Coefficients) -> torch.Tensor:
    """Pass A with the coefficients the first rule kernel formed."""
    return _stats(opt, batch, coefficients.moments, coefficients.s_coef)


def _stats(opt, batch, moments: torch.Tensor, s_coef: torch.Tensor) -> torch.Tensor:
    """Pass A: (items, 2) fp64 ⟨g_J, p0 − x_J⟩ and ‖s_new‖₁ per tensor (0 for lr = 0 tensors, which it skips)."""
    hp = opt.rule_group()
    slices = batch.index(it.group["slice_p"] for it in batch.items)
    decay = batch.per_item("weight_decay")
    parts = []
    for group in dtype_groups(batch, lambda it, sliced: _slots(it), key=lambda it: it.group["slice_p"] > 1,
                              only=lambda it: it.group["lr"] > 0):
        geo = group.geo
        partials = group.partials(2)
        launch(_prodigy_stats_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(6)), geo.numels,
               geo.block_tensor, geo.block_start, group.take(slices), group.take(decay), group.take(s_coef), moments,
               ok_flag(batch), partials, X=group.tl_dtype, ACC=group.acc, COUPLED=not hp["decouple"],
               HAS_M=hp["betas"][0] > 0, SLICED=group.variant, **group.tiling(warps=8),
               **rounding(batch, group, params=False, state=True))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts) if parts else torch.zeros((len(batch.items), 2), dtype=torch.float64,
                                                           device=batch.device)


def prodigy_apply(opt, batch, steps: torch.Tensor, d_new: torch.Tensor, proceed: torch.Tensor) -> None:
    """``steps``: every tensor's c λ (fp64, one per item); ``proceed``: whether to update (bool, or the int32
    flag of the second rule kernel)."""
    hp = opt.rule_group()
    flag = proceed if proceed.dtype == torch.int32 else proceed.to(torch.int32)
    decay, eps = batch.per_item("weight_decay"), batch.per_item("eps")
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state.get("exp_avg", it.state["exp_avg_sq"]),
                                                 it.state["exp_avg_sq"])):
        geo = group.geo
        launch(_prodigy_apply_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(4)), geo.numels,
               geo.block_tensor, geo.block_start, group.take(decay), group.take(eps), group.take(steps), d_new, flag,
               X=group.tl_dtype, ACC=group.acc, COUPLED=not hp["decouple"], HAS_M=hp["betas"][0] > 0,
               **group.tiling(warps=4), **rounding(batch, group, state=True))
