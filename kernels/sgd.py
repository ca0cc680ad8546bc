"""Apply pass of every SGD-direction method (the Polyak family, DoG, LDoG):

    x ← x − c_t · (g + λ_t x)          (per-tensor step c_t and coupled weight decay λ_t)

optionally copying x into a best-iterate buffer first (Inexact Polyak's ``best_iterate``). One launch
per parameter dtype; a rejected step returns before touching memory. Bytes: R 8 (x, g), W 4 (x).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import dtype_groups, launch, ok_flag
from .scalar_math import accept, column_total, commit, finish, fused, rule_kernel, scale_vector, step_inputs


@rule_kernel
def _polyak_rule_kernel(grad_sq, n, h, lr, coef, flag_out, step_size, a, b, loss, found_inf, ok_out, steps, skipped,
                        RULE: tl.constexpr, Q: tl.constexpr, V: tl.constexpr, GUARD: tl.constexpr,
                        HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """The Polyak family's step in one program (methods/_polyak.py): accept, η from the method's rule,
    the store, the counters, and coef_i = lr_i · η for every tensor."""
    total = column_total(grad_sq, n, 0, 1)
    ok = accept(total, loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    step, a_new, b_new, flag = RULE(tl.load(loss).to(tl.float64), total, tl.load(steps), tl.load(a), tl.load(b),
                                    h, Q, V)
    commit(step_size, step, ok)
    commit(a, a_new, ok)
    commit(b, b_new, ok)
    tl.store(flag_out, (ok & flag).to(tl.int32))
    finish(ok, ok, ok_out, steps, skipped)
    scale_vector(coef, lr, n, step)


_FUSED_RULES: dict = {}


def polyak_rule(opt, batch, grad_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the rule kernel of a Polyak-family method on the step's per-tensor Σg²; returns every
    tensor's coefficient lr_i · η and the rule's flag (int32, set only if the step is accepted)."""
    rule = type(opt).rule
    kernel_rule = _FUSED_RULES.get(rule)
    if kernel_rule is None:
        kernel_rule = _FUSED_RULES[rule] = fused(rule)
    S = opt.S
    names = (opt.rule_state + ("steps", "steps"))[:2]  # a stand-in where a method keeps fewer
    coef = torch.empty(len(batch.items), dtype=torch.float64, device=batch.device)
    flag = torch.empty((), dtype=torch.int32, device=batch.device)
    quirks, variant = opt._rule_flags()
    launch(_polyak_rule_kernel, (1,), grad_sq, len(batch.items), batch.vector(opt._rule_hyperparameters() or (0.0,)),
           batch.per_item("lr"), coef, flag, S["step_size"], S[names[0]], S[names[1]], RULE=kernel_rule, Q=quirks,
           V=variant, **step_inputs(batch))
    return coef, flag


@triton.jit
def _sgd_apply_kernel(x_ptrs, g_ptrs, best_ptrs, numels, block_tensor, block_start, coef, decay, ok, copy_best,
                      sr_seeds, X: tl.constexpr, ACC: tl.constexpr, HAS_DECAY: tl.constexpr, TRACK_BEST: tl.constexpr,
                      SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(ok) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask).to(ACC)
    if HAS_DECAY:
        g = g + tl.load(decay + t).to(ACC) * x
    if TRACK_BEST:
        if tl.load(copy_best) != 0:
            tl.store(tensor_ptr(best_ptrs, t, X, ALIGNED) + offs, x.to(X), mask=mask)
    tl.store(x_ptr + offs, to_param(x - tl.load(coef + t).to(ACC) * g, X, SR, sr_seeds, t, offs), mask=mask)


def sgd_apply(opt, batch, coef: torch.Tensor, decay: torch.Tensor | None = None,
              copy_best: torch.Tensor | None = None) -> None:
    """``coef``/``decay``: (items,) fp64 device vectors; ``copy_best``: 0-d bool, store x in
    ``state['best']`` before the update (the caller handles parameters without a gradient)."""
    track = copy_best is not None
    best_flag = copy_best.to(torch.int32) if track else ok_flag(batch)
    for group in dtype_groups(batch, (lambda it: (it.p, it.g, it.state["best"])) if track else
                              (lambda it: (it.p, it.g))):
        geo = group.geo
        launch(_sgd_apply_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2) if track else geo.slot(0),
               geo.numels, geo.block_tensor, geo.block_start, group.take(coef),
               group.take(decay) if decay is not None else coef, ok_flag(batch), best_flag,
               X=group.tl_dtype, ACC=group.acc, HAS_DECAY=decay is not None, TRACK_BEST=track, **group.tiling(warps=4), **rounding(batch, group))
