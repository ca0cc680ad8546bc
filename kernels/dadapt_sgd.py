"""D-Adapt SGD (ALGORITHMS §4.5): a rule kernel, one element pass, a rule kernel.

The first rule kernel decides the step (``_dadapt``) and forms λ_k = d_k γ / ‖g_0‖ (``dadapt_sgd_step_size``
of methods/dadapt_sgd.py) and every tensor's step c_t λ_k; the element pass, for every tensor t, with wd, β
from group 0

    g ← g + wd x;   (lr > 0)  ⟨g, s⟩ (old s),  s ← s + c_t λ_k g,  Σ s²;   x ← β x + (1 − β)(x0 − s)

R 16 (g, x, s, x0), W 8 (s, x), partials ⟨g, s_old⟩ and ‖s_new‖² per tensor; the second rule kernel sums
them, N += λ_k Σ⟨g, s⟩ and Q = Σ ‖s‖²/c, runs ``distance_rule`` and commits the store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrfree.methods.dadapt_sgd import dadapt_sgd_step_size as _step_size_rule, distance_rule as _distance_rule

from .multi_tensor import program_elements, tensor_ptr
from .rounding import SALT_S, rounding, to_param, to_state
from .common import assemble, dtype_groups, grad_sq_until, launch, ok_flag, reduce_partials
from .scalar_math import commit, fused, rule_kernel, scale_vector
from ._dadapt import count_step, decide, decision_inputs, scaled_total

STEP_SIZE = fused(_step_size_rule)
DISTANCE = fused(_distance_rule)


@rule_kernel
def _dadapt_sgd_step_size_kernel(grad_sq, n, weights, ratios, n_items, h, d, g0_norm, steps_out, pending,
                                 witness, n_witness, loss, found_inf, ok_out, skipped, total_steps,
                                 GUARD: tl.constexpr, HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                                 DECIDE: tl.constexpr, COUNT_TOTAL: tl.constexpr):
    """Accept; ‖g_0‖ and λ_k from Σ_t w_t Σg²_t (``grad_sq``: n rows, w = the lr ratios c; or the one row
    of the flag-gated launch, w = 1); every tensor's step c_t λ_k; (λ_k, ‖g_0‖) to ``pending``, which the
    second kernel commits with the rest of the store."""
    decide(witness, n_witness, loss, found_inf, ok_out, skipped, total_steps, GUARD, HAS_LOSS, HAS_FOUND_INF,
           DECIDE, COUNT_TOTAL)
    g0, dlr = STEP_SIZE(tl.load(d), tl.load(g0_norm), scaled_total(grad_sq, n, 0, 1, weights, 1.0, True),
                        tl.load(h))
    tl.store(pending, dlr)
    tl.store(pending + 1, g0)
    scale_vector(steps_out, ratios, n_items, dlr)  # every tensor's c λ


@rule_kernel
def _dadapt_sgd_distance_kernel(stats, n, inverse_ratios, h, pending, d, d_hat, numerator, step_size, g0_norm,
                                ok_out, steps, ADAPT: tl.constexpr):
    """N + λ_k Σ⟨g, s⟩_t and Q = Σ ‖s‖²_t / c_t from the pass's (n, 2) statistics; d from ``distance_rule``;
    the store committed where the step is accepted and ‖s‖ > 0, which ``steps`` counts."""
    dlr = tl.load(pending)
    total = tl.load(numerator) + scaled_total(stats, n, 0, 2, inverse_ratios, dlr, False)
    s_sq = scaled_total(stats, n, 1, 2, inverse_ratios, 1.0, True)
    hat, d_next, estimable = DISTANCE(tl.load(d), total, s_sq, tl.load(h + 1), ADAPT)
    proceed = (tl.load(ok_out) != 0) & estimable
    commit(numerator, total, proceed)
    commit(d_hat, hat, proceed)
    commit(d, d_next, proceed)
    commit(step_size, dlr, proceed)
    commit(g0_norm, tl.load(pending + 1), proceed)
    count_step(steps, proceed)


def dadapt_sgd_step_size(opt, batch, lr: float, ratios: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first rule kernel: decides the step; returns every tensor's step c_t λ_k (fp64, one per item)
    and (λ_k, ‖g_0‖), which the second kernel commits. ‖g_0‖² = Σ c ‖g‖² comes from the guard's Σg² pass,
    or without the guard from the flag-gated launch (``common.until_known``) that streams the gradients only
    until ‖g_0‖ is known."""
    S = opt.S
    decision = decision_inputs(opt, batch)
    whole = getattr(opt, "_whole_step", None)  # per-group d: the whole step, whose Σg² the guard reduced
    if opt.skip_nonfinite and whole is None:
        grad_sq, weights = batch.local_grad_sq, batch.vector(ratios)
    elif opt.skip_nonfinite:  # this group's rows of the whole step's Σg² (weight 0 elsewhere)
        grad_sq = whole.local_grad_sq
        weights = whole.vector(c if it.group_index == opt._current_group else 0.0
                               for it, c in zip(whole.items, opt._lr_ratios(whole)))
    else:
        keep = [i for i, c in enumerate(ratios) if c > 0]
        grad_sq = grad_sq_until(batch.subset(keep), S["g0_norm"] > 0, batch.vector(ratios[i] for i in keep))
        weights = batch.vector((1.0,))
    steps = torch.empty(len(batch.items), dtype=torch.float64, device=batch.device)
    pending = torch.empty(2, dtype=torch.float64, device=batch.device)
    launch(_dadapt_sgd_step_size_kernel, (1,), grad_sq, grad_sq.shape[0], weights, batch.vector(ratios),
           len(batch.items), _hyperparameters(opt, batch, lr), S["d"], S["g0_norm"], steps, pending, **decision)
    return steps, pending


def dadapt_sgd_distance(opt, batch, lr: float, ratios: list[float], stats: torch.Tensor,
                        pending: torch.Tensor) -> None:
    """The second rule kernel, on the element pass's (items, 2) statistics and the first kernel's
    (λ_k, ‖g_0‖)."""
    S = opt.S
    launch(_dadapt_sgd_distance_kernel, (1,), stats, stats.shape[0],
           batch.vector(1.0 / c if c > 0 else 0.0 for c in ratios), _hyperparameters(opt, batch, lr), pending,
           S["d"], S["d_hat"], S["numerator"], S["step_size"], S["g0_norm"], ok_flag(batch), S["steps"],
           ADAPT=lr > 0)


def _hyperparameters(opt, batch, lr: float) -> torch.Tensor:
    """(γ, growth rate): what the rules read, as one cached fp64 vector."""
    return batch.vector((lr, opt.rule_group()["growth_rate"]))


@triton.jit
def _dadapt_sgd_kernel(x_ptrs, g_ptrs, s_ptrs, x0_ptrs, numels, block_tensor, block_start, adapting, dlr, ok,
                       partials, coeffs, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr,
                       SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    # the accept flag as a block mask (stores of a rejected step are masked off)
    accept = (tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, S, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    decay = tl.load(coeffs).to(ACC)
    beta = tl.load(coeffs + 1).to(ACC)
    averaging = tl.load(coeffs + 2).to(ACC)  # 1 − β, formed in fp64 on the host
    g = g + decay * x
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    if tl.load(adapting + t) != 0:
        tl.store(partials + 2 * pid, tl.sum(g * s, axis=0))
        s = s + tl.load(dlr + t).to(ACC) * g
        tl.store(partials + 2 * pid + 1, tl.sum(s * s, axis=0))
        tl.store(s_ptr + offs, to_state(s, S, sr_seeds, t, offs, SALT_S), mask=mask & accept)
    else:
        tl.store(partials + 2 * pid, 0.0)
        tl.store(partials + 2 * pid + 1, 0.0)
    x0 = tl.load(tensor_ptr(x0_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    tl.store(x_ptr + offs, to_param(x * beta + (x0 - s) * averaging, X, SR, sr_seeds, t, offs), mask=mask & accept)


def dadapt_sgd_step(opt, batch, steps: torch.Tensor, decay: float, beta: float) -> torch.Tensor:
    """``steps``: every tensor's c·λ (fp64, one per item)."""
    adapting = batch.vector(float(it.group["lr"] > 0) for it in batch.items)
    parts = []
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state["s"], it.state["x0"])):
        geo = group.geo
        partials = group.partials(2)
        launch(_dadapt_sgd_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2), geo.slot(3), geo.numels,
               geo.block_tensor, geo.block_start, group.take(adapting), group.take(steps), ok_flag(batch), partials,
               batch.vector((decay, beta, 1.0 - beta)),
               X=group.tl_dtype, ACC=group.acc, **group.tiling(warps=4), **rounding(batch, group, state=True))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)
