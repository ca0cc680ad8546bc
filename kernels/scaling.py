"""The Adam scaling rule of PS-SPS and PS-DA-SGD in registers (the fused twin of methods/_scaling.py).

Per step the method forms one fp64 coefficient vector (``methods._scaling.scale_coefficients``), so
every kernel reads the same bias corrections and complements without forming 1 − β in low precision:

    [β1, 1−β1, 1−β1^t, β2, 1−β2, 1−β2^t, max(1−β2^(t−1), 1 if t = 1), ε]
"""

from __future__ import annotations

import triton
import triton.language as tl


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
