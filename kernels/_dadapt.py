"""What the rule kernels of the D-Adaptation family share (methods/_dadapt.py): the accept decision, made
once per step also when every param group steps its own d, and weighted totals over a step's per-tensor
statistics.

A member's fused step is two rule kernels around its element pass(es): the first decides the step and
forms the pass's coefficients (the step size λ_k), the second reduces the pass's per-tensor statistics,
runs the member's rule for d and commits the store. The accept flag is needed by the element pass, so it
is the first kernel's; the step counter counts a step taken *and* with a non-zero denominator, known only
to the second. So the first kernel counts ``skipped`` and the second ``steps``.

With ``per_group_d`` every param group runs its own pair of rule kernels on its own scalars (the store's
per-group entries, through ``DAdaptBase``'s 0-d views), but a step is taken or rejected as a whole: the
first group's kernel decides, from the whole step's witness, counts ``skipped`` and the optimizer-wide
``steps``, and the later groups' kernels read its flag (``DECIDE=False``). Each group's second kernel
counts its own ``group_steps``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .scalar_math import LANES, accept, column_total, step_inputs


@triton.jit
def decide(witness, n_witness, loss, found_inf, ok_out, skipped, total_steps, GUARD: tl.constexpr,
           HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr, DECIDE: tl.constexpr, COUNT_TOTAL: tl.constexpr):
    """The step's accept flag. ``DECIDE``: from the witness (Σ of the per-tensor Σg² column ``witness``),
    the loss and GradScaler's flag; it is written to ``ok_out`` (int32, for the element passes and the
    later groups), a rejected step counts in ``skipped`` and, under ``COUNT_TOTAL`` (per-group d: the
    optimizer-wide counter), a taken one in ``total_steps``. Else the flag a previous group's kernel wrote."""
    if DECIDE:
        ok = accept(column_total(witness, n_witness, 0, 1), loss, found_inf, GUARD, HAS_LOSS, HAS_FOUND_INF)
        tl.store(ok_out, ok.to(tl.int32))
        tl.store(skipped, tl.load(skipped) + tl.where(ok, 0.0, 1.0))
        if COUNT_TOTAL:
            tl.store(total_steps, tl.load(total_steps) + tl.where(ok, 1.0, 0.0))
    else:
        ok = tl.load(ok_out) != 0
    return ok


@triton.jit
def scaled_total(stats, n, col, K: tl.constexpr, weights, scale, WEIGHTED: tl.constexpr):
    """Σ_t (w_t · scale) · stats[t, col] over the rows of an (n, K) fp64 matrix, in a fixed order (lanes,
    then a fixed tree); w_t from the fp64 vector ``weights`` under ``WEIGHTED`` (else 1). A row of weight 0
    adds nothing, also where its statistic is not finite: a group with lr = 0 is no part of d."""
    acc = tl.zeros((LANES,), dtype=tl.float64)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        x = tl.load(stats + idx * K + col, mask=inside, other=0.0).to(tl.float64)
        if WEIGHTED:
            w = tl.load(weights + idx, mask=inside, other=0.0)
            acc += tl.where(w != 0, (w * scale) * x, 0.0)
        else:
            acc += scale * x
        i0 += LANES
    return tl.sum(acc, axis=0)


@triton.jit
def count_step(steps, taken):
    """``*steps`` += 1 if ``taken`` (the second rule kernel's end)."""
    tl.store(steps, tl.load(steps) + tl.where(taken, 1.0, 0.0))


def decision_inputs(opt, batch) -> dict:
    """The arguments of :func:`decide` (with the loss and found-inf inputs ``accept`` reads) for the first
    rule kernel of ``batch``; sets ``batch.ok_i32``, the flag the element passes read."""
    whole = getattr(opt, "_whole_step", None)  # the whole step, under per-group d
    owner = batch if whole is None else whole
    decided = owner.ok_i32  # under per-group d, set by the first group's kernel
    inputs = step_inputs(owner)
    del inputs["steps"]  # the second rule kernel counts the steps (the group's, under per-group d)
    if decided is not None:
        inputs["ok_out"] = owner.ok_i32 = decided
    guard = inputs["GUARD"] and decided is None
    witness = owner.local_grad_sq if guard else inputs["skipped"]  # (a stand-in pointer without the guard)
    batch.ok_i32 = owner.ok_i32
    return dict(witness=witness, n_witness=witness.shape[0] if guard else 0, total_steps=opt._scalar_store["steps"],
                DECIDE=decided is None, COUNT_TOTAL=whole is not None and decided is None, **inputs)
