"""The Adam scaling rule of PS-SPS and PS-DA-SGD in registers (the fused twin of methods/_scaling.py).

Per step the method forms one fp64 coefficient vector (``methods._scaling.scale_coefficients_rule``, in
one launch: :func:`coefficients`), so every kernel reads the same bias corrections and complements
without forming 1 − β in low precision:

    [β1, 1−β1, 1−β1^t, β2, 1−β2, 1−β2^t, max(1−β2^(t−1), 1 if t = 1), ε]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrfree.methods._scaling import scale_coefficients_rule

from .multi_tensor import launch
from .scalar_math import fused, rule_kernel

N_COEFFICIENTS = 8
_RULE = fused(scale_coefficients_rule)


@rule_kernel
def _coefficients_kernel(steps, h, out, known, known_out, RULE: tl.constexpr, HAS_KNOWN: tl.constexpr):
    beta1, one_minus_beta1, bc1, beta2, one_minus_beta2, bc2, bc2_prev, eps = RULE(tl.load(steps) + 1.0, h)
    tl.store(out + 0, beta1)
    tl.store(out + 1, one_minus_beta1)
    tl.store(out + 2, bc1)
    tl.store(out + 3, beta2)
    tl.store(out + 4, one_minus_beta2)
    tl.store(out + 5, bc2)
    tl.store(out + 6, bc2_prev)
    tl.store(out + 7, eps)
    if HAS_KNOWN:
        tl.store(known_out, (tl.load(known) > 0).to(tl.int32))


def coefficients(batch, steps: torch.Tensor, h: torch.Tensor, known: torch.Tensor | None = None):
    """The step's (8,) fp64 coefficient vector from the rule's 0-d step counter ``steps`` and h = (β1, β2,
    ε), in one launch; given a 0-d fp64 ``known``, also the int32 flag ``known > 0`` (returns the pair)."""
    out = torch.empty(N_COEFFICIENTS, dtype=torch.float64, device=batch.device)
    flag = torch.empty((), dtype=torch.int32, device=batch.device)
    launch(_coefficients_kernel, (1,), steps, h, out, steps if known is None else known, flag, RULE=_RULE,
           HAS_KNOWN=known is not None)
    return out if known is None else (out, flag)


@triton.jit
def adam_scale(g, v, vmax, c, ACC: tl.constexpr, AMSGRAD: tl.constexpr):
    """(v_new, v̂max_new, α²_t, α²_{t−1}): α² = √v̂ + ε from the stored v (or the running max of the
    bias-corrected v̂ under AMSGrad)."""
    beta2 = tl.load(c + 3).to(ACC)
    v_new = beta2 * v + tl.load(c + 4).to(ACC) * g * g
    eps = tl.load(c + 7).to(ACC)
    if AMSGRAD:
        vmax_new = tl.maximum(vmax, v_new / tl.load(c + 5).to(ACC))
        alpha_sq = tl.sqrt(vmax_new) + eps
        alpha_sq_prev = tl.sqrt(vmax) + eps
    else:
        vmax_new = vmax
        alpha_sq = tl.sqrt(v_new) / tl.sqrt(tl.load(c + 5).to(ACC)) + eps
        alpha_sq_prev = tl.sqrt(v) / tl.sqrt(tl.load(c + 6).to(ACC)) + eps
    return v_new, vmax_new, alpha_sq, alpha_sq_prev


@triton.jit
def direction(g, m, alpha_sq, c, ACC: tl.constexpr, HAS_M: tl.constexpr):
    """(m_new, u): u = m̂/α² with m̂ the bias-corrected EMA of gradients, or g/α² without momentum."""
    if HAS_M:
        m_new = m + tl.load(c + 1).to(ACC) * (g - m)
        u = (m_new / tl.load(c + 2).to(ACC)) / alpha_sq
    else:
        m_new = m
        u = g / alpha_sq
    return m_new, u
