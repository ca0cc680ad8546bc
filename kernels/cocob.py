"""COCOB-Backprop in one pass, no reductions (ALGORITHMS §4.8):

    g̃ = (g + wd x) γ;  L ← max(L, |g̃|);  θ ← θ − g̃;  G ← G + |g̃|;  R ← max(R − g̃ (x − x0), 0)
    x ← x0 + (L + R) θ / (L max(G + L, α L))            R 28 (g, x, θ, G, L, R, x0)  W 20

γ (the group's lr) and α are per tensor: ``coeffs`` holds (γ, α) of tensor t at 2t, 2t + 1 (fp64).

COCOB has no scalar rule; single-process, its one-program ``_accept_kernel`` makes the accept decision from
the guard's Σg² and counts the step (a step: the Σg² pass and its reduction, that kernel and this pass; without
the guard, the kernel and this pass).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, salt, to_param, to_state
from .common import dtype_groups, launch, ok_flag
from .scalar_math import accept, column_total, finish, rule_kernel, step_inputs


@rule_kernel
def _accept_kernel(grad_sq, n, loss, found_inf, ok_out, steps, skipped, GUARD: tl.constexpr, HAS_LOSS: tl.constexpr,
                   HAS_FOUND_INF: tl.constexpr):
    """The rule kernel of a method without a scalar rule: the accept decision (the witness: Σ of the ``n``
    per-tensor Σg²) and the counters."""
    ok = accept(column_total(grad_sq, n, 0, 1), loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    finish(ok, ok, ok_out, steps, skipped)


def cocob_accept(opt, batch) -> None:
    """Launch the accept kernel: writes the step's accept flag (``batch.ok_i32``) and counts the step. Without
    the guard nothing reads the gradients' Σg², and no pass forms it."""
    guard = opt.skip_nonfinite
    launch(_accept_kernel, (1,), batch.local_grad_sq if guard else opt.S["steps"], len(batch.items) if guard else 0,
           **step_inputs(batch))


_SALT_THETA, _SALT_GSUM = salt("sum_negative_gradients"), salt("grad_norm_sum")
_SALT_L, _SALT_R = salt("L"), salt("reward")


@triton.jit
def _cocob_kernel(x_ptrs, g_ptrs, theta_ptrs, gsum_ptrs, l_ptrs, r_ptrs, x0_ptrs, numels, block_tensor, block_start,
                  decay_vec, coeffs, ok, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr,
                  SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    theta_ptr = tensor_ptr(theta_ptrs, t, S, ALIGNED)
    gsum_ptr = tensor_ptr(gsum_ptrs, t, S, ALIGNED)
    l_ptr = tensor_ptr(l_ptrs, t, S, ALIGNED)
    r_ptr = tensor_ptr(r_ptrs, t, S, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    x0 = tl.load(tensor_ptr(x0_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    g = (g + tl.load(decay_vec + t).to(ACC) * x) * tl.load(coeffs + 2 * t).to(ACC)
    big_l = tl.maximum(tl.load(l_ptr + offs, mask=mask, other=1.0).to(ACC), tl.abs(g))
    theta = tl.load(theta_ptr + offs, mask=mask).to(ACC) - g
    gsum = tl.load(gsum_ptr + offs, mask=mask).to(ACC) + tl.abs(g)
    reward = tl.maximum(tl.load(r_ptr + offs, mask=mask).to(ACC) - g * (x - x0), 0.0)
    denom = tl.maximum(gsum + big_l, big_l * tl.load(coeffs + 2 * t + 1).to(ACC)) * big_l
    tl.store(l_ptr + offs, to_state(big_l, S, sr_seeds, t, offs, _SALT_L), mask=mask)
    tl.store(theta_ptr + offs, to_state(theta, S, sr_seeds, t, offs, _SALT_THETA), mask=mask)
    tl.store(gsum_ptr + offs, to_state(gsum, S, sr_seeds, t, offs, _SALT_GSUM), mask=mask)
    tl.store(r_ptr + offs, to_state(reward, S, sr_seeds, t, offs, _SALT_R), mask=mask)
    tl.store(x_ptr + offs, to_param((reward + big_l) * theta / denom + x0, X, SR, sr_seeds, t, offs), mask=mask)


def cocob_step(opt, batch) -> None:
    # (items, 2): row t is tensor t's (γ, α); a dtype group takes its rows, which the kernel reads at 2t, 2t + 1
    coeffs = batch.vector(v for it in batch.items for v in (it.group["lr"], it.group["alpha"])).view(-1, 2)
    decay = batch.per_item("weight_decay")
    keys = ("sum_negative_gradients", "grad_norm_sum", "L", "reward", "x0")
    for group in dtype_groups(batch, lambda it: (it.p, it.g, *(it.state[k] for k in keys))):
        geo = group.geo
        launch(_cocob_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(7)), geo.numels, geo.block_tensor,
               geo.block_start, group.take(decay), group.take(coeffs), ok_flag(batch), X=group.tl_dtype, ACC=group.acc,
               **group.tiling(warps=8), **rounding(batch, group, state=True))
