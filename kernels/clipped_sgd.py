"""Clipped SGD apply pass: d = κ g + λ x;  b ← μ b + d (and d ← d + μ b with Nesterov, else d ← b);
x ← x − lr d. The clip coefficient κ (its group's, from the global norm), lr, λ, μ and Nesterov are per
tensor (param groups). Tensors with and without a momentum buffer launch separately. Bytes: R 8 (+4), W 4 (+4).

Single-process, every κ comes from the rule kernel ``_clip_rule_kernel`` (the method's ``clip_rule``, with the
accept decision, ‖g‖, the store and the counters): a step is the Σg² pass and its reduction, the rule kernel
and this pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, salt, to_param, to_state
from .common import dtype_groups, launch, ok_flag
from .scalar_math import LANES, accept, column_total, commit, finish, fused, rule_kernel, step_inputs


@rule_kernel
def _clip_rule_kernel(grad_sq, n, group_of, max_norm, eps, n_groups, clip, clip_store, grad_norm, loss, found_inf,
                      ok_out, steps, skipped, RULE: tl.constexpr, GUARD: tl.constexpr, HAS_LOSS: tl.constexpr,
                      HAS_FOUND_INF: tl.constexpr):
    """ClippedSGD's step in one program: accept, ‖g‖ from the per-tensor Σg², every group's κ (the store,
    committed if accepted), every tensor's κ (its group's: ``clip``) and the counters."""
    total = column_total(grad_sq, n, 0, 1)
    ok = accept(total, loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    norm = tl.sqrt(total)
    commit(grad_norm, norm, ok)
    finish(ok, ok, ok_out, steps, skipped)
    j0 = 0
    while j0 < n_groups:
        idx = j0 + tl.arange(0, LANES)
        inside = idx < n_groups
        kappa = RULE(norm, tl.load(max_norm + idx, mask=inside, other=1.0), tl.load(eps + idx, mask=inside, other=1.0))
        old = tl.load(clip_store + idx, mask=inside, other=1.0)
        tl.store(clip_store + idx, tl.where(ok, kappa, old), mask=inside)
        j0 += LANES
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        group = tl.load(group_of + idx, mask=inside, other=0)
        kappa = RULE(norm, tl.load(max_norm + group, mask=inside, other=1.0),
                     tl.load(eps + group, mask=inside, other=1.0))
        tl.store(clip + idx, kappa, mask=inside)
        i0 += LANES


_FUSED_RULE = []


def clip_rule(opt, batch) -> torch.Tensor:
    """Launch ClippedSGD's rule kernel on the step's per-tensor Σg²; returns every tensor's κ (fp64). The
    store (clip_coef, grad_norm) and the counters are updated and the accept flag written in the launch."""
    from lrfree.methods.clipped_sgd import clip_rule as rule
    if not _FUSED_RULE:
        _FUSED_RULE.append(fused(rule))
    S = opt.S
    n = len(batch.items)
    max_norm, eps = opt._clip_vectors()
    clip = torch.empty(n, dtype=torch.float64, device=batch.device)
    launch(_clip_rule_kernel, (1,), batch.local_grad_sq, n, batch.index(it.group_index for it in batch.items),
           max_norm, eps, len(opt.param_groups), clip, S["clip_coef"], S["grad_norm"], RULE=_FUSED_RULE[0],
           **step_inputs(batch))
    return clip


_SALT_BUF = salt("momentum_buffer")


@triton.jit
def _clipped_apply_kernel(x_ptrs, g_ptrs, buf_ptrs, numels, block_tensor, block_start, clip, lr, decay, momentum,
                          nesterov, ok, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, S: tl.constexpr,
                          HAS_BUF: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    d = g * tl.load(clip + t).to(ACC) + tl.load(decay + t).to(ACC) * x
    if HAS_BUF:
        buf_ptr = tensor_ptr(buf_ptrs, t, S, ALIGNED)
        mu = tl.load(momentum + t).to(ACC)
        buf = mu * tl.load(buf_ptr + offs, mask=mask).to(ACC) + d
        tl.store(buf_ptr + offs, to_state(buf, S, sr_seeds, t, offs, _SALT_BUF), mask=mask)
        d = tl.where(tl.load(nesterov + t) != 0, d + mu * buf, buf)
    tl.store(x_ptr + offs, to_param(x - tl.load(lr + t).to(ACC) * d, X, SR, sr_seeds, t, offs), mask=mask)


def clipped_apply(opt, batch, clip: torch.Tensor) -> None:
    """``clip``: every tensor's κ (fp64, one per item)."""
    lr, decay = batch.per_item("lr"), batch.per_item("weight_decay")
    momentum = batch.per_item("momentum")
    nesterov = batch.vector(float(it.group["nesterov"]) for it in batch.items)

    def slots(it, has_buf):
        return (it.p, it.g, it.state["momentum_buffer"]) if has_buf else (it.p, it.g)

    for group in dtype_groups(batch, slots, key=lambda it: it.group["momentum"] > 0):
        geo = group.geo
        launch(_clipped_apply_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1),
               geo.slot(2) if group.variant else geo.slot(0), geo.numels, geo.block_tensor, geo.block_start, group.take(clip),
               group.take(lr), group.take(decay), group.take(momentum), group.take(nesterov), ok_flag(batch),
               X=group.tl_dtype, ACC=group.acc, HAS_BUF=group.variant, **group.tiling(warps=4),
               **rounding(batch, group, state=True))
