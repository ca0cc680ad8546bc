"""D-Adapt Adam in one pass (ALGORITHMS §4.6). Per tensor, λ = dlr, c its group's lr ratio, r = layer_scale·c:

    g ← g + wd x (coupled);   (lr > 0)  ⟨g, s/(√v+ε)⟩ (old s, v);  m ← β1 m + rλ(1−β1) g;
    v ← β2 v + (1−β2) g²;  s ← √β2 s + λ(1−√β2) g;  ‖s‖₁;     x ← x − c wd λ x (decoupled);  x ← x − m/(√v+ε)
    (lr = 0: nothing is written, x included)

R 20 (g, x, s, m, v), W 16 (s, m, v, x); partials ⟨g, s/(√v+ε)⟩ and ‖s_new‖₁ per tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials


@triton.jit
def _dadapt_adam_kernel(x_ptrs, g_ptrs, s_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, eps_vec,
                        decay_vec, scale_vec, adapting, dlr_ptr, ok, partials, coeffs, sr_seeds, X: tl.constexpr,
                        ACC: tl.constexpr, DECOUPLE: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
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
    m_ptr = tensor_ptr(m_ptrs, t, ACC, ALIGNED)
    v_ptr = tensor_ptr(v_ptrs, t, ACC, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if tl.load(adapting + t) != 0:
        s_ptr = tensor_ptr(s_ptrs, t, ACC, ALIGNED)
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        if not DECOUPLE:
            g = g + decay * x
        s = tl.load(s_ptr + offs, mask=mask, other=0.0)
        tl.store(partials + 2 * pid, tl.sum(g * (s / (tl.sqrt(v) + eps)), axis=0))
        m = beta1 * m + (tl.load(scale_vec + t).to(ACC) * dlr * one_minus_beta1) * g
        v = beta2 * v + one_minus_beta2 * g * g
        s = sqrt_beta2 * s + (dlr * one_minus_sqrt_beta2) * g
        tl.store(partials + 2 * pid + 1, tl.sum(tl.abs(s), axis=0))
        tl.store(m_ptr + offs, m, mask=mask & accept)
        tl.store(v_ptr + offs, v, mask=mask & accept)
        tl.store(s_ptr + offs, s, mask=mask & accept)
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
               DECOUPLE=hp["decouple"], **group.tiling(warps=8), **rounding(batch, group))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)
