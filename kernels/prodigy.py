"""Prodigy in two passes (ALGORITHMS §4.7): the update needs the new d inside ε.

Pass A (lr > 0 tensors), with J the elements whose flat index is a multiple of the tensor's slice_p:
    g ← g + wd x (coupled);   ⟨g_J, p0 − x_J⟩;   m ← β1 m + d(1−β1) g;   v ← β2 v + d²(1−β2) g²;
    s ← β3 s + c_s g_J;   ‖s‖₁                                   R 24 (g, x, p0, s, m, v)  W 12
Pass B, with λ_t = c_t λ (the tensor's group lr ratio times the shared step, an fp64 per-tensor vector):
    x ← x − wd λ_t x (decoupled);  x ← x − λ_t m / (√v + d_new ε)   (β1 = 0: λ_t d_new g / (...))   R 12  W 4
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .rounding import rounding, to_param
from .common import assemble, dtype_groups, launch, ok_flag, reduce_partials


@triton.jit
def _prodigy_stats_kernel(x_ptrs, g_ptrs, p0_ptrs, s_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start,
                          slice_vec, decay_vec, s_coef_vec, coeffs, ok, partials, X: tl.constexpr,
                          ACC: tl.constexpr, COUPLED: tl.constexpr, HAS_M: tl.constexpr, SLICED: tl.constexpr,
                          BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    accept = (tl.zeros([BLOCK], dtype=tl.int32) + tl.load(ok)) != 0
    x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    if COUPLED:
        g = g + tl.load(decay_vec + t).to(ACC) * x
    # (β1, d(1−β1), β2, d²(1−β2), β3): d-dependent coefficients are formed on device in fp64
    if HAS_M:
        m_ptr = tensor_ptr(m_ptrs, t, ACC, ALIGNED)
        m = tl.load(coeffs).to(ACC) * tl.load(m_ptr + offs, mask=mask, other=0.0) + tl.load(coeffs + 1).to(ACC) * g
        tl.store(m_ptr + offs, m, mask=mask & accept)
    v_ptr = tensor_ptr(v_ptrs, t, ACC, ALIGNED)
    v = tl.load(coeffs + 2).to(ACC) * tl.load(v_ptr + offs, mask=mask, other=0.0) + tl.load(coeffs + 3).to(ACC) * g * g
    tl.store(v_ptr + offs, v, mask=mask & accept)
    if SLICED:  # s and p0 keep every slice_p-th element: 64-bit division per element, so only when needed
        stride = tl.load(slice_vec + t)
        sliced = mask & (offs % stride == 0)
        j = offs // stride
    else:
        sliced = mask
        j = offs
    p0 = tl.load(tensor_ptr(p0_ptrs, t, X, ALIGNED) + j, mask=sliced, other=0.0).to(ACC)
    s_ptr = tensor_ptr(s_ptrs, t, ACC, ALIGNED)
    s = tl.load(coeffs + 4).to(ACC) * tl.load(s_ptr + j, mask=sliced, other=0.0) + tl.load(s_coef_vec + t).to(ACC) * g
    s = tl.where(sliced, s, 0.0)
    tl.store(s_ptr + j, s, mask=sliced & accept)
    tl.store(partials + 2 * pid, tl.sum(tl.where(sliced, g * (p0 - x), 0.0), axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum(tl.abs(s), axis=0))


@triton.jit
def _prodigy_apply_kernel(x_ptrs, g_ptrs, m_ptrs, v_ptrs, numels, block_tensor, block_start, decay_vec, eps_vec,
                          dlr_ptr, d_new_ptr, proceed, sr_seeds, X: tl.constexpr, ACC: tl.constexpr, COUPLED: tl.constexpr,
                          HAS_M: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    if tl.load(proceed) == 0:
        return
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    dlr = tl.load(dlr_ptr + t).to(ACC)
    d_new = tl.load(d_new_ptr).to(ACC)
    decay = tl.load(decay_vec + t).to(ACC)
    x_ptr = tensor_ptr(x_ptrs, t, X, ALIGNED)
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    denom = tl.sqrt(tl.load(tensor_ptr(v_ptrs, t, ACC, ALIGNED) + offs, mask=mask)) \
        + d_new * tl.load(eps_vec + t).to(ACC)
    if HAS_M:
        step = dlr * tl.load(tensor_ptr(m_ptrs, t, ACC, ALIGNED) + offs, mask=mask) / denom
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
    hp = opt.rule_group()
    beta1, beta2 = hp["betas"]
    beta3 = hp["beta3"] if hp["beta3"] is not None else beta2 ** 0.5
    coeffs = torch.stack([torch.full_like(d, beta1), d * (1 - beta1), torch.full_like(d, beta2),
                          d * d * (1 - beta2), torch.full_like(d, beta3)])
    weight = torch.where(batch.vector(float(it.group["safeguard_warmup"]) for it in batch.items) != 0, d, dlr)
    s_coef = (d / batch.per_item("d0")) * weight * ratios  # × c: s sees the reparametrized gradient c·g
    slices = batch.index(it.group["slice_p"] for it in batch.items)
    decay = batch.per_item("weight_decay")
    parts = []
    for group in dtype_groups(batch, lambda it, sliced: _slots(it), key=lambda it: it.group["slice_p"] > 1,
                              only=lambda it: it.group["lr"] > 0):
        geo = group.geo
        partials = group.partials(2)
        launch(_prodigy_stats_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(6)), geo.numels,
               geo.block_tensor, geo.block_start, group.take(slices), group.take(decay), group.take(s_coef), coeffs,
               ok_flag(batch), partials, X=group.tl_dtype, ACC=group.acc, COUPLED=not hp["decouple"],
               HAS_M=beta1 > 0, SLICED=group.variant, **group.tiling(warps=8))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts) if parts else torch.zeros((len(batch.items), 2), dtype=torch.float64,
                                                           device=batch.device)


def prodigy_apply(opt, batch, steps: torch.Tensor, d_new: torch.Tensor, proceed: torch.Tensor) -> None:
    """``steps``: every tensor's c λ (fp64, one per item)."""
    hp = opt.rule_group()
    flag = proceed.to(torch.int32)
    decay, eps = batch.per_item("weight_decay"), batch.per_item("eps")
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state.get("exp_avg", it.state["exp_avg_sq"]),
                                                 it.state["exp_avg_sq"])):
        geo = group.geo
        launch(_prodigy_apply_kernel, (geo.n_blocks,), *(geo.slot(i) for i in range(4)), geo.numels,
               geo.block_tensor, geo.block_start, group.take(decay), group.take(eps), group.take(steps), d_new, flag,
               X=group.tl_dtype, ACC=group.acc, COUPLED=not hp["decouple"], HAS_M=hp["betas"][0] > 0,
               **group.tiling(warps=4), **rounding(batch, group))
