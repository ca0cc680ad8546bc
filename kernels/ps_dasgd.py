"""PS-DA-SGD (methods/ps_dasgd.py) as fused passes.

A step (``psdasgd_rule_step``): the coefficients (one program, ``scaling.coefficients``, with the flag
"n0 known"); the non-finite guard's Σg² pass (under skip_nonfinite); the start pass; the step-size rule
kernel (accept, n0, d, λ = d γ / n0 and every tensor's c_t λ, which the step pass needs); the step pass;
the distance rule kernel (ρ, N, d, the store, the counters).

Start pass (common.until_known: a persistent launch of at most 1024 programs that streams g and v only
until the device says n0 is known, and writes zeros after):
    Σ c_t g²/α²  and  Σ c_t α²  over all elements (α from this step's v, computed in registers, nothing
    written; c_t the tensor's group lr ratio, an fp64 per-tensor vector)
Step pass, one per step (R 20: g, x, v, m, s; W 16: v, m, s, x), λ_t = c_t λ per tensor:
    α², α²_prev;  u = m̂/α² (+ wd x);  ⟨g, s_old⟩;  s ← s + λ_t u;  Σ α² s²;  max α²_prev/α²
    x ← x − λ_t u     (or μ_t x + (1 − μ_t)(x0 − s) with primal averaging, μ_t per tensor)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrfree.methods import ps_dasgd as method
from lrfree.methods._scaling import scale_coefficients

from .multi_tensor import block_elements, program_elements, tensor_ptr
from .rounding import SALT_EXP_AVG, SALT_EXP_AVG_SQ, SALT_MAX_EXP_AVG_SQ, SALT_S, rounding, to_param, to_state
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials, until_known, until_known_end
from .scaling import adam_scale, direction
from .scalar_math import (LANES, accept, column_max, column_total, commit, finish, fused, rule_kernel,
                          step_inputs)

_STEP_SIZE = fused(method.psdasgd_step_size)
_SHRINK = fused(method.psdasgd_shrink)
_DISTANCE = fused(method.psdasgd_distance)


@triton.jit(do_not_specialize=["n_blocks", "programs"])
def _start_kernel(g_ptrs, v_ptrs, vmax_ptrs, numels, block_tensor, block_start, c, weights, started, partials, n_blocks,
                  programs, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr, SCALED: tl.constexpr,
                  AMSGRAD: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Persistent (common.until_known): program pid sums blocks pid, pid + programs, ... while n0 is not
    known, and writes its row of fp64 sums (zeros once ``started``)."""
    pid = tl.program_id(0)
    ratio = tl.zeros((), tl.float64)
    alpha = tl.zeros((), tl.float64)
    end = until_known_end(started, n_blocks)
    b = pid
    while b < end:
        t, offs, mask = block_elements(b, numels, block_tensor, block_start, BLOCK, ALIGNED)
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if SCALED:
            v = tl.load(tensor_ptr(v_ptrs, t, S, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
            vmax = v
            if AMSGRAD:
                vmax = tl.load(tensor_ptr(vmax_ptrs, t, S, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
            _, _, alpha_sq, _ = adam_scale(g, v, vmax, c, ACC, AMSGRAD)
        else:
            alpha_sq = tl.full([BLOCK], 1.0, ACC)
        # the block's sums in ACC, as one program of a full grid forms them; the program's total in fp64
        # ... times the tensor's lr ratio, in fp64 (1 for every tensor when the group lrs are equal)
        weight = tl.load(weights + t)
        ratio += tl.sum(g * g / alpha_sq, axis=0).to(tl.float64) * weight
        alpha += tl.sum(tl.where(mask, alpha_sq, 0.0), axis=0).to(tl.float64) * weight
        b += programs
    tl.store(partials + 2 * pid, ratio)
    tl.store(partials + 2 * pid + 1, alpha)


@triton.jit
def _step_kernel(x_ptrs, g_ptrs, s_ptrs, m_ptrs, v_ptrs, vmax_ptrs, x0_ptrs, numels, block_tensor, block_start,
                 c, decay_vec, dlr_ptr, averaging, ok, partials, sr_seeds, X: tl.constexpr, ACC: tl.constexpr,
                 S: tl.constexpr, SCALED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_M: tl.constexpr,
                 AVERAGING: tl.constexpr,
                 SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    store = mask & ((tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    s_ptr = tensor_ptr(s_ptrs, t, S, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC)
    if SCALED:
        v_ptr = tensor_ptr(v_ptrs, t, S, ALIGNED)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(ACC)
        vmax = v
        if AMSGRAD:
            vmax_ptr = tensor_ptr(vmax_ptrs, t, S, ALIGNED)
            vmax = tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(ACC)
        v_new, vmax_new, alpha_sq, alpha_sq_prev = adam_scale(g, v, vmax, c, ACC, AMSGRAD)
        tl.store(v_ptr + offs, to_state(v_new, S, sr_seeds, t, offs, SALT_EXP_AVG_SQ), mask=store)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, to_state(vmax_new, S, sr_seeds, t, offs, SALT_MAX_EXP_AVG_SQ), mask=store)
    else:
        alpha_sq = tl.full([BLOCK], 1.0, ACC)
        alpha_sq_prev = alpha_sq
    m = tl.zeros([BLOCK], ACC)
    if HAS_M:
        m_ptr = tensor_ptr(m_ptrs, t, S, ALIGNED)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC)
    m_new, u = direction(g, m, alpha_sq, c, ACC, HAS_M)
    if HAS_M:
        tl.store(m_ptr + offs, to_state(m_new, S, sr_seeds, t, offs, SALT_EXP_AVG), mask=store)
    u = u + tl.load(decay_vec + t).to(ACC) * x
    dlr = tl.load(dlr_ptr + t).to(ACC)  # the tensor's step c·λ
    tl.store(partials + 3 * pid, tl.sum(g * s, axis=0))
    s = s + dlr * u
    tl.store(s_ptr + offs, to_state(s, S, sr_seeds, t, offs, SALT_S), mask=store)
    tl.store(partials + 3 * pid + 1, tl.sum(tl.where(mask, alpha_sq * s * s, 0.0), axis=0))
    tl.store(partials + 3 * pid + 2, tl.max(tl.where(mask, alpha_sq_prev / alpha_sq, 0.0), axis=0))
    if AVERAGING:
        x0 = tl.load(tensor_ptr(x0_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        x = x * tl.load(averaging + 2 * t).to(ACC) + (x0 - s) * tl.load(averaging + 2 * t + 1).to(ACC)
    else:
        x = x - dlr * u
    tl.store(x_ptr + offs, to_param(x, X, SR, sr_seeds, t, offs), mask=store)


def _state_slots(it, hp):
    st = it.state
    v = st.get("exp_avg_sq", it.p)
    return (it.p, it.g, st["s"], st.get("exp_avg", v), v, st.get("max_exp_avg_sq", v), st.get("x0", it.p))


def _flags(hp):
    return dict(SCALED=hp["scaling"] == "adam", AMSGRAD=hp["amsgrad"] and hp["scaling"] == "adam")


def psdasgd_start(opt, batch, c: torch.Tensor, started: torch.Tensor, ratios: torch.Tensor,
                  reduce: bool = True) -> torch.Tensor:
    """(1, 2) fp64: Σ c_t g²/α² and Σ c_t α² over the batch's elements until n0 is known (``started``),
    zeros after; ``ratios`` the tensors' lr ratios c_t (fp64, one per item). One launch with the rule
    group's AMSGRAD flag even when groups differ: the pass streams only until the first accepted step
    with a non-zero gradient, and until then v = v̂max = 0, where both scalings give the same α.
    ``reduce=False``: the (P, 2) rows of the persistent programs, which the step-size rule kernel totals."""
    hp = opt.rule_group()
    return until_known(batch, started, _start_kernel, 2, lambda it: _state_slots(it, hp),
                       lambda group: (group.geo.slot(1), group.geo.slot(4), group.geo.slot(5), group.geo.numels,
                                      group.geo.block_tensor, group.geo.block_start, c, group.take(ratios)),
                       warps=4, reduce=reduce, group_flags=lambda group: {"S": group.state_tl}, **_flags(hp))


def psdasgd_step(opt, batch, c: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``steps``: every tensor's c·λ (fp64, one per item). Tensors launch apart by their group's AMSGrad
    and primal-averaging switches (compile-time constants)."""
    hp = opt.rule_group()
    decay = batch.per_item("weight_decay")
    # (items, 2): row t is tensor t's (μ, 1 − μ), read by the kernel at 2t, 2t + 1
    averaging = batch.vector(v for it in batch.items for v in (it.group["momentum"], 1.0 - it.group["momentum"]))
    averaging = averaging.view(-1, 2)
    parts = []
    for group in dtype_groups(batch, lambda it, variant: _state_slots(it, hp),
                              key=lambda it: (bool(it.group["amsgrad"]), it.group["momentum"] > 0)):
        amsgrad, averaged = group.variant
        geo = group.geo
        partials = group.partials(3)
        launch(_step_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(7)), geo.numels, geo.block_tensor,
               geo.block_start, c, group.take(decay), group.take(steps), group.take(averaging), ok_flag(batch),
               partials, X=group.tl_dtype, ACC=group.acc, HAS_M=hp["betas"][0] > 0, AVERAGING=averaged,
               **group.tiling(warps=8), **_flags({**hp, "amsgrad": amsgrad}), **rounding(batch, group, state=True))
        parts.append((group, reduce_partials(group, partials, max_columns=(2,))))
    return assemble(batch, parts)


# ------------------------------------------------------------------------------------------ the rule
# h = PSDASGD._rule_hyperparameters: (d0, γ, growth rate, number of elements); the scratch row carries the
# step's (n0, d, λ) from the step-size kernel to the distance kernel
_D0, _LR, _GROWTH, _N_ELEMENTS = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@rule_kernel
def _step_size_kernel(witness, n_witness, start, n_start, h, ratios, n, tensor_steps, scratch, g0_norm, d, loss,
                      found_inf, ok_out, steps, skipped, RULE: tl.constexpr, GUARD: tl.constexpr,
                      HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Before the step pass: the accept decision (its flag is the step pass's), (n0, d, λ) from
    ``psdasgd_step_size`` on the start pass's (n_start, 2) rows, and every tensor's step c_t λ."""
    ok = accept(column_total(witness, n_witness, 0, 1), loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    tl.store(ok_out, ok.to(tl.int32))
    n0, d_now, dlr = RULE(tl.load(g0_norm), tl.load(d), column_total(start, n_start, 0, 2),
                          column_total(start, n_start, 1, 2), tl.load(h + _N_ELEMENTS), tl.load(h + _D0),
                          tl.load(h + _LR))
    tl.store(scratch, n0)
    tl.store(scratch + 1, d_now)
    tl.store(scratch + 2, dlr)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        tl.store(tensor_steps + idx, dlr * tl.load(ratios + idx, mask=inside, other=0.0), mask=inside)
        i0 += LANES


@rule_kernel
def _distance_kernel(stats, n, inv_ratios, scratch, h, numerator, d_hat, d, g0_norm, step_size, scale_ratio, ok_out,
                     steps, skipped, SHRINK: tl.constexpr, RULE: tl.constexpr, ADAPT: tl.constexpr):
    """After the step pass: ρ and N/ρ from ``psdasgd_shrink``, N = N/ρ + Σ λ⟨g, s⟩ (``StepBatch.reduce`` with
    a start, as the torch rule forms it), d̂ and d from ``psdasgd_distance``, on the pass's per-tensor
    (⟨g, s⟩, ‖α ⊙ s‖², max α²_prev/α²) rows; the store (where the step is accepted and ‖α ⊙ s‖ > 0) and
    the counters."""
    ok = tl.load(ok_out) != 0
    n0, d_now, dlr = tl.load(scratch), tl.load(scratch + 1), tl.load(scratch + 2)
    ratio, shrunk = SHRINK(tl.load(steps) + 1.0, column_max(stats, n, 2, 3), tl.load(numerator))
    # Σ λ ⟨g, s⟩ and Σ ‖α ⊙ s‖² / c_t (s measured in the reparametrized coordinates, methods/_dadapt.py)
    dots = tl.zeros((LANES,), dtype=tl.float64)
    weighted = tl.zeros((LANES,), dtype=tl.float64)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        dots += dlr * tl.load(stats + idx * 3, mask=inside, other=0.0)
        weighted += tl.load(inv_ratios + idx, mask=inside, other=0.0) * tl.load(stats + idx * 3 + 1, mask=inside,
                                                                                other=0.0)
        i0 += LANES
    num = shrunk + tl.sum(dots, axis=0)
    d_estimate, d_next, proceed = RULE(num, tl.sum(weighted, axis=0), d_now, tl.load(h + _GROWTH), ADAPT)
    proceed = ok & proceed
    commit(numerator, num, proceed)
    commit(d_hat, d_estimate, proceed)
    commit(d, d_next, proceed)
    commit(g0_norm, n0, proceed)
    commit(step_size, dlr, proceed)
    commit(scale_ratio, ratio, proceed)
    finish(ok, proceed, ok_out, steps, skipped)


def psdasgd_rule_step(opt, batch, adapting) -> None:
    """One step of PS-DA-SGD on a fused backend in a single process: ``adapting`` is the subset of
    ``batch`` with lr > 0 (the others are not touched). With every lr at 0 nothing streams, and the two rule
    kernels, over no tensor, still decide the step (a rejected one counts as skipped) and take nothing."""
    S = opt.S
    inputs = step_inputs(batch)
    guard = inputs["GUARD"]
    witness = batch.local_grad_sq if guard else S["steps"]  # after batch.subset, which would copy it
    n_witness = len(batch.items) if guard else 0
    adapting.ok_i32 = batch.ok_i32  # the step pass reads the accept flag through the subset
    n = len(adapting.items)
    ratios = opt._lr_ratios(adapting)
    h = adapting.vector(opt._rule_hyperparameters(adapting))
    tensor_steps = torch.empty(n, dtype=torch.float64, device=batch.device)
    scratch = torch.empty(3, dtype=torch.float64, device=batch.device)
    if n:
        ratio_vec, inverse_ratios = adapting.vector(ratios), adapting.vector(1.0 / r for r in ratios)
        c, started = scale_coefficients(adapting, opt.rule_group(), S["steps"], S["g0_norm"])
        start = psdasgd_start(opt, adapting, c, started, ratio_vec, reduce=False)
    else:  # stand-ins for the vectors of no tensor (the kernels read none of them)
        ratio_vec = inverse_ratios = start = tensor_steps = scratch
    launch(_step_size_kernel, (1,), witness, n_witness, start, start.shape[0] if n else 0, h, ratio_vec, n,
           tensor_steps, scratch, S["g0_norm"], S["d"], RULE=_STEP_SIZE, **inputs)
    stats = psdasgd_step(opt, adapting, c, tensor_steps) if n else scratch
    launch(_distance_kernel, (1,), stats, n, inverse_ratios, scratch, h, S["numerator"], S["d_hat"], S["d"],
           S["g0_norm"], S["step_size"], S["scale_ratio"], inputs["ok_out"], inputs["steps"], inputs["skipped"],
           SHRINK=_SHRINK, RULE=_DISTANCE, ADAPT=opt._shared_lr() > 0)
