"""D-Adapt Adam (ALGORITHMS §4.6): a rule kernel, one element pass, a rule kernel.

The first rule kernel decides the step (``_dadapt``) and forms λ = d_k γ bc_k (``adam_step_size`` of
methods/_dadapt.py). The element pass, per tensor, with c its group's lr ratio and r = layer_scale·c:

    g ← g + wd x (coupled);   (lr > 0)  ⟨g, s/(√v+ε)⟩ (old s, v);  m ← β1 m + rλ(1−β1) g;
    v ← β2 v + (1−β2) g²;  s ← √β2 s + λ(1−√β2) g;  ‖s‖₁;     x ← x − c wd λ x (decoupled);  x ← x − m/(√v+ε)
    (lr = 0: nothing is written, x included)

R 20 (g, x, s, m, v), W 16 (s, m, v, x); partials ⟨g, s/(√v+ε)⟩ and ‖s_new‖₁ per tensor. The second rule
kernel sums them weighted by r (A = λ Σ r⟨g, s/(√v+ε)⟩, S1 = Σ r‖s‖₁), runs ``dadapt_adam_rule`` and
commits the store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrfree.methods._dadapt import adam_step_size as _step_size_rule
from lrfree.methods.dadapt_adam import dadapt_adam_rule as _rule

from .multi_tensor import program_elements, tensor_ptr
from .rounding import SALT_EXP_AVG, SALT_EXP_AVG_SQ, SALT_S, rounding, to_param, to_state
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials
from .scalar_math import commit, fused, rule_kernel
from ._dadapt import count_step, decide, decision_inputs, scaled_total

STEP_SIZE = fused(_step_size_rule)
RULE = fused(_rule)


@rule_kernel
def _dadapt_adam_step_size_kernel(h, d, steps, dlr_out, witness, n_witness, loss, found_inf, ok_out, skipped,
                                  total_steps, BIAS_CORRECTION: tl.constexpr, GUARD: tl.constexpr,
                                  HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr, DECIDE: tl.constexpr,
                                  COUNT_TOTAL: tl.constexpr):
    """Accept, and λ_k (``dlr_out``) from d_k and the steps taken; h = (γ, β1, β2, √β2, growth rate)."""
    decide(witness, n_witness, loss, found_inf, ok_out, skipped, total_steps, GUARD, HAS_LOSS, HAS_FOUND_INF,
           DECIDE, COUNT_TOTAL)
    tl.store(dlr_out, STEP_SIZE(tl.load(d), tl.load(h), tl.load(steps), tl.load(h + 1), tl.load(h + 2),
                                BIAS_CORRECTION))


@rule_kernel
def _dadapt_adam_distance_kernel(stats, n, scale, h, dlr_ptr, d, d_hat, numerator, step_size, ok_out, steps,
                                 ADAPT: tl.constexpr):
    """A = Σ (r_t λ) ⟨g, s/(√v+ε)⟩_t and S1 = Σ r_t ‖s‖₁_t from the pass's (n, 2) statistics; N and d from
    ``dadapt_adam_rule``; the store committed where the step is accepted and S1 > 0, which ``steps`` counts."""
    dlr = tl.load(dlr_ptr)
    numerator_step = scaled_total(stats, n, 0, 2, scale, dlr, True)
    s_l1 = scaled_total(stats, n, 1, 2, scale, 1.0, True)
    total, hat, d_next, estimable = RULE(tl.load(d), tl.load(numerator), numerator_step, s_l1, tl.load(h + 3),
                                         tl.load(h + 4), ADAPT)
    proceed = (tl.load(ok_out) != 0) & estimable
    commit(numerator, total, proceed)
    commit(d_hat, hat, proceed)
    commit(d, d_next, proceed)
    commit(step_size, dlr, proceed)
    count_step(steps, proceed)


def dadapt_adam_step_size(opt, batch, lr: float) -> torch.Tensor:
    """The first rule kernel: decides the step; returns λ_k (fp64, one element)."""
    S = opt.S
    dlr = torch.empty(1, dtype=torch.float64, device=batch.device)
    launch(_dadapt_adam_step_size_kernel, (1,), _hyperparameters(opt, batch, lr), S["d"], S["steps"], dlr,
           BIAS_CORRECTION=opt.rule_group()["use_bias_correction"], **decision_inputs(opt, batch))
    return dlr


def dadapt_adam_distance(opt, batch, lr: float, scale: torch.Tensor, stats: torch.Tensor, dlr: torch.Tensor) -> None:
    """The second rule kernel, on the element pass's (items, 2) statistics; ``scale``: every tensor's r."""
    S = opt.S
    launch(_dadapt_adam_distance_kernel, (1,), stats, stats.shape[0], scale, _hyperparameters(opt, batch, lr), dlr,
           S["d"], S["d_hat"], S["numerator"], S["step_size"], ok_flag(batch), S["steps"], ADAPT=lr > 0)


def _hyperparameters(opt, batch, lr: float) -> torch.Tensor:
    """(γ, β1, β2, √β2, growth rate): what the rules read, as one cached fp64 vector."""
    hp = opt.rule_group()
    beta1, beta2 = hp["betas"]
    return batch.vector((lr, beta1, beta2, beta2 ** 0.5, hp["growth_rate"]))


@triton.jit
def _dadapt_adam_kernel(x_ptrs, g_ptrs, s_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, eps_vec,
                        decay_vec, scale_vec, adapting, dlr_ptr, ok, partials, coeffs, sr_seeds, X: tl.constexpr,
                        ACC: tl.constexpr, S: tl.constexpr, DECOUPLE: tl.constexpr, SR: tl.constexpr,
                        BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    accept = (tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0
    # (β1, 1−β1, β2, 1−β2, √β2, 1−√β2): the complements come from the host in fp64, since 1 − β2
    # formed in fp32 loses 4 digits to cancellation
    beta1 = tl.load(coeffs).to(ACC)
    one_minus_beta1 = tl.load(coeffs + 1).to(ACC)
    beta2 = tl.load(coeffs + 2).to(ACC)
    one_minus_beta2 = tl.load(coeffs + 3).to(ACC)
    sqrt_beta2 = tl.load(coeffs + 4).to(ACC)
    one_minus_sqrt_beta2 = tl.load(coeffs + 5).to(ACC)
    eps = tl.load(eps_vec + t).to(ACC)
    decay = tl.load(decay_vec + t).to(ACC)
    dlr = tl.load(dlr_ptr).to(ACC)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
    if tl.load(adapting + t) != 0:
        s_ptr = tensor_ptr(s_ptrs, t, S, ALIGNED)
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if not DECOUPLE:
            g = g + decay * x
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(partials + 2 * pid, tl.sum(g * (s / (tl.sqrt(v) + eps)), axis=0))
        m = beta1 * m + (tl.load(scale_vec + t).to(ACC) * dlr * one_minus_beta1) * g
        v = beta2 * v + one_minus_beta2 * g * g
        s = sqrt_beta2 * s + (dlr * one_minus_sqrt_beta2) * g
        tl.store(partials + 2 * pid + 1, tl.sum(tl.abs(s), axis=0))
        tl.store(m_ptr + offs, to_state(m, S, sr_seeds, t, offs, SALT_EXP_AVG), mask=mask & accept)
        tl.store(v_ptr + offs, to_state(v, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=mask & accept)
        tl.store(s_ptr + offs, to_state(s, S, sr_seeds, t, offs, SALT_S), mask=mask & accept)
        if DECOUPLE:
            x = x - decay * dlr * x  # decay = c·wd: the decay step is part of the group's step
        tl.store(x_ptr + offs, to_param(x - m / (tl.sqrt(v) + eps), X, SR, sr_seeds, t, offs), mask=mask & accept)
    else:  # lr = 0: the group's step is 0, so x is left as it is (no decay, no stale m)
        tl.store(partials + 2 * pid, 0.0)
        tl.store(partials + 2 * pid + 1, 0.0)


def dadapt_adam_step(opt, batch, dlr: torch.Tensor, ratios: list[float]) -> torch.Tensor:
    """``ratios``: every tensor's lr ratio c (host floats)."""
    hp = opt.rule_group()
    beta1, beta2 = hp["betas"]
    coeffs = batch.vector((beta1, 1 - beta1, beta2, 1 - beta2, beta2 ** 0.5, 1 - beta2 ** 0.5))
    eps = batch.per_item("eps")
    # decoupled, the decay is a step and scales with the group's lr ratio; coupled, it is part of g
    decay = batch.vector(it.group["weight_decay"] * (c if hp["decouple"] else 1.0) for it, c in zip(batch.items, ratios))
    scale = batch.vector(it.group["layer_scale"] * c for it, c in zip(batch.items, ratios))
    adapting = batch.vector(float(it.group["lr"] > 0) for it in batch.items)
    parts = []
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state["s"], it.state["exp_avg"],
                                                 it.state["exp_avg_sq"])):
        geo = group.geo
        partials = group.partials(2)
        launch(_dadapt_adam_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(5)), geo.numels,
               geo.block_tensor, geo.block_start, group.take(eps), group.take(decay), group.take(scale),
               group.take(adapting), dlr, ok_flag(batch), partials, coeffs, X=group.tl_dtype, ACC=group.acc,
               DECOUPLE=hp["decouple"], **group.tiling(warps=8), **rounding(batch, group, state=True))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)
