"""DoG / LDoG statistics pass: per tensor ‖g + λx‖² and ‖x − x0‖² (R 12: x, g, x0; nothing written). It is
also the step's non-finite guard (its first column is non-finite whenever a gradient element is), so a
step is this pass and the shared SGD apply pass (R 8, W 4): 24 B per element in fp32. Between them, the
rule kernel (``dog_rule``): one program that decides the step from the guard's column, runs the method's
rule (``lrfree.methods.dog.dog_rule``) for every segment and writes every tensor's step for the apply pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .common import assemble, dtype_groups, launch, reduce_partials
from .scalar_math import LANES, accept, column_total, commit, finish, fused, rule_kernel, step_inputs
from .sgd import sgd_apply  # noqa: F401  (DoG's apply pass)


@triton.jit
def _dog_stats_kernel(x_ptrs, g_ptrs, x0_ptrs, numels, block_tensor, block_start, decay, partials,
                      X: tl.constexpr, ACC: tl.constexpr, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(tensor_ptr(x0_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    if HAS_DECAY:
        g = g + tl.load(decay + t).to(ACC) * x
    dx = x - x0
    tl.store(partials + 2 * pid, tl.sum(g * g, axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum(dx * dx, axis=0))


def dog_stats(opt, batch, decay: torch.Tensor | None) -> torch.Tensor:
    parts = []
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state["x0"])):
        geo = group.geo
        partials = group.partials(2)
        launch(_dog_stats_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2), geo.numels,
               geo.block_tensor, geo.block_start, group.take(decay) if decay is not None else partials, partials,
               X=group.tl_dtype, ACC=group.acc, HAS_DECAY=decay is not None, **group.tiling(warps=4))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)


@rule_kernel
def _dog_rule_kernel(stats, n, bounds, n_seg, seg, hyper, resting, coef, t_store, rbar_store, G_store, eta_store,
                     x0_norm_store, loss, found_inf, ok_out, steps, skipped, RULE: tl.constexpr,
                     SEGMENT_IS_TENSOR: tl.constexpr, HAS_RESTING: tl.constexpr, GUARD: tl.constexpr,
                     HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """DoG's step in one program: accept (the witness: Σ‖g + λx‖² over every tensor), the counters, and for
    every segment s (store entry seg[s]; the step's tensors bounds[s] to bounds[s + 1]) its statistics, the
    rule, the committed store and every tensor's step coef_i = η_s. ``hyper``: (n_seg, 4) reps_rel, eps, lr,
    init_eta; ``resting``: (n_seg,) ‖x − x0‖² of the segment's tensors without a gradient (HAS_RESTING).

    SEGMENT_IS_TENSOR (LDoG; DoG with one tensor per group): segment s is tensor s and LANES segments step
    at once. Otherwise the segments (param groups: a few) step one after another, each summing its
    tensors' rows LANES at a time."""
    ok = accept(column_total(stats, n, 0, 2), loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
    finish(ok, ok, ok_out, steps, skipped)
    if SEGMENT_IS_TENSOR:
        i0 = 0
        while i0 < n:
            idx = i0 + tl.arange(0, LANES)
            inside = idx < n
            k = tl.load(seg + idx, mask=inside, other=0)
            dist_sq = tl.load(stats + 2 * idx + 1, mask=inside, other=0.0)
            if HAS_RESTING:
                dist_sq += tl.load(resting + idx, mask=inside, other=0.0)
            t = tl.load(t_store + k, mask=inside, other=0.0)
            rbar = tl.load(rbar_store + k, mask=inside, other=0.0)
            G = tl.load(G_store + k, mask=inside, other=0.0)
            eta_old = tl.load(eta_store + k, mask=inside, other=0.0)
            h = hyper + 4 * idx
            rbar_new, G_new, eta, t_new = RULE(
                t, rbar, G, tl.load(x0_norm_store + k, mask=inside, other=0.0),
                tl.load(stats + 2 * idx, mask=inside, other=0.0), dist_sq, tl.load(h, mask=inside, other=0.0),
                tl.load(h + 1, mask=inside, other=0.0), tl.load(h + 2, mask=inside, other=0.0),
                tl.load(h + 3, mask=inside, other=0.0))
            tl.store(t_store + k, tl.where(ok, t_new, t), mask=inside)
            tl.store(rbar_store + k, tl.where(ok, rbar_new, rbar), mask=inside)
            tl.store(G_store + k, tl.where(ok, G_new, G), mask=inside)
            tl.store(eta_store + k, tl.where(ok, eta, eta_old), mask=inside)
            tl.store(coef + idx, eta, mask=inside)
            i0 += LANES
    else:
        s = 0
        while s < n_seg:
            lo = tl.load(bounds + s)
            hi = tl.load(bounds + s + 1)
            dist_sq = column_total(stats + 2 * lo, hi - lo, 1, 2)
            if HAS_RESTING:
                dist_sq += tl.load(resting + s)
            k = tl.load(seg + s)
            t = tl.load(t_store + k)
            h = hyper + 4 * s
            rbar_new, G_new, eta, t_new = RULE(t, tl.load(rbar_store + k), tl.load(G_store + k),
                                               tl.load(x0_norm_store + k), column_total(stats + 2 * lo, hi - lo, 0, 2),
                                               dist_sq, tl.load(h), tl.load(h + 1), tl.load(h + 2), tl.load(h + 3))
            commit(t_store + k, t_new, ok)
            commit(rbar_store + k, rbar_new, ok)
            commit(G_store + k, G_new, ok)
            commit(eta_store + k, eta, ok)
            i0 = lo
            while i0 < hi:
                idx = i0 + tl.arange(0, LANES)
                tl.store(coef + idx, tl.zeros((LANES,), dtype=tl.float64) + eta, mask=idx < hi)
                i0 += LANES
            s += 1


_FUSED_RULES: dict = {}


def dog_rule(opt, batch, stats: torch.Tensor, segments: list[int], bounds: list[int],
             resting: torch.Tensor | None) -> torch.Tensor:
    """Launch DoG's rule kernel on the step's (items, 2) statistics; ``segments`` (store entries) and
    ``bounds`` (their first item, and the end) as ``DoG._update`` forms them, ``resting`` per segment or
    None. Returns every tensor's step η (fp64, the apply pass's coefficients)."""
    rule = type(opt).rule
    kernel_rule = _FUSED_RULES.get(rule)
    if kernel_rule is None:
        kernel_rule = _FUSED_RULES[rule] = fused(rule)
    S = opt.S
    n = len(batch.items)
    coef = torch.empty(n, dtype=torch.float64, device=batch.device)
    rows = opt.segment_hyperparameters([batch.items[a].group for a in bounds[:-1]])
    hyper = batch.vector(v for row in rows for v in row)  # (segments, 4), row-major
    # a segment per tensor: a dozen fp64 vectors of LANES live at once, 2 lanes per thread at 16 warps (at
    # 4 warps, 8 lanes per thread need 255 registers and spill on sm_90)
    per_tensor = len(segments) == n
    launch(_dog_rule_kernel, (1,), stats, n, opt._coefficient_vector(tuple(bounds), torch.int32), len(segments),
           batch.index(segments), hyper, stats if resting is None else resting, coef, S["t"], S["rbar"], S["G"],
           S["eta"], S["x0_norm"], RULE=kernel_rule, SEGMENT_IS_TENSOR=per_tensor, HAS_RESTING=resting is not None,
           num_warps=16 if per_tensor else 4, **step_inputs(batch))
    return coef
