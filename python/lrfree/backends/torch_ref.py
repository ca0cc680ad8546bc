"""Plain-PyTorch building blocks of the reference backend.

The reference backend is written for clarity and exactness, not speed: per-tensor loops, fp64
accumulation of every reduction, and predicated writes so that a skipped step leaves parameters and
state bit-identical. The fused backends are tested against it.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """Element-wise math runs in fp32 for fp32/bf16/fp16 storage and in fp64 for fp64 storage."""
    return F64 if p.dtype == F64 else torch.float32


def up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in the compute dtype of parameter ``like`` (a no-op when it already is)."""
    return t.to(compute_dtype(like))


def commit_(dst: torch.Tensor, new: torch.Tensor, ok: torch.Tensor) -> None:
    """Store ``new`` into ``dst`` if the step is accepted, else leave ``dst`` exactly as it was.

    ``torch.where`` never mixes the two, so NaNs in a rejected ``new`` cannot leak into ``dst``; a
    low-precision ``dst`` upcast and rounded back is bit-identical.
    """
    dst.copy_(torch.where(ok, new, dst))


# Fused multiply-adds, rounded exactly like torch's ``add(alpha=)``, ``addcmul`` and ``addcdiv`` kernels
# (which use FMA) even when the coefficient is a device scalar; the reference packages are written with
# those ops, and matching their rounding keeps fp64 oracle comparisons tight through chaotic phases.
Coef = float | torch.Tensor


def axpy(a: torch.Tensor, b: torch.Tensor, alpha: Coef) -> torch.Tensor:
    """``a + alpha * b`` as ``torch.add(a, b, alpha=alpha)``."""
    if isinstance(alpha, torch.Tensor):
        return torch.addcmul(a, b, alpha)
    return torch.add(a, b, alpha=alpha)


def addcmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Coef) -> torch.Tensor:
    """``x + value * a * b`` as ``torch.addcmul``."""
    if isinstance(value, torch.Tensor):
        return torch.addcmul(x, a * value, b)
    return torch.addcmul(x, a, b, value=value)


def addcdiv(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor, value: Coef) -> torch.Tensor:
    """``x + value * num / den`` as ``torch.addcdiv``."""
    if isinstance(value, torch.Tensor):
        return torch.addcdiv(x, num * value, den)
    return torch.addcdiv(x, num, den, value=value)


def sumsq(t: torch.Tensor) -> torch.Tensor:
    t = t.to(F64)
    return (t * t).sum()


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.to(F64).reshape(-1), b.to(F64).reshape(-1))


def l1(t: torch.Tensor) -> torch.Tensor:
    return t.to(F64).abs().sum()


def safe_div(num: torch.Tensor, den: torch.Tensor, fallback: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else ``fallback``: the device form of a guarded division."""
    den_pos = den > 0
    quotient = num / torch.where(den_pos, den, torch.ones_like(den))
    # a device fill, not a host-to-device copy: steps must stay capturable in CUDA graphs
    other = fallback if isinstance(fallback, torch.Tensor) else torch.full_like(quotient, fallback)
    return torch.where(den_pos, quotient, other)


def sgd_apply_(batch, coef: torch.Tensor, decay: torch.Tensor | None = None,
               copy_best: torch.Tensor | None = None) -> None:
    """``x ← x − coef_i (g_i + decay_i x_i)`` for every active tensor, committed only if the step is
    accepted; with ``copy_best``, ``state['best'] ← x`` first where that flag is set. The reference of
    ``lrfree.kernels.sgd.sgd_apply``."""
    for i, it in enumerate(batch.items):
        x = up(it.p, it.p)
        if copy_best is not None:
            commit_(it.state["best"], it.p, copy_best)
        d = up(it.g, it.p) if decay is None else axpy(up(it.g, it.p), x, decay[i])
        commit_(it.p, batch.rounded(it, axpy(x, d, -coef[i])), batch.ok)


# ----------------------------------------------------------------------------------- stochastic rounding
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # lrfree.kernels.rounding.MIX


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixer of ``lrfree.kernels.rounding.mix32`` on int64 tensors holding uint32 values."""
    x = ((x ^ (x >> 16)) * _MIX) & _MASK32
    x = ((x ^ (x >> 16)) * _MIX) & _MASK32
    return x ^ (x >> 16)


def stochastic_round_bf16(value: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``value`` (fp32) stochastically rounded to bf16 with the bits the fused kernels draw for a tensor
    whose step seed is ``seed`` (0-d int64): element i is dithered by ``mix32(i ^ seed) & 0xFFFF``."""
    index = torch.arange(value.numel(), device=value.device, dtype=torch.int64).view(value.shape)
    bits = mix32((index & _MASK32) ^ seed) & 0xFFFF
    raw = value.to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & _MASK32
    dithered = (raw + bits) & 0xFFFF0000
    dithered = torch.where(dithered >= 2**31, dithered - 2**32, dithered).to(torch.int32).view(torch.float32)
    return torch.where(value.isnan(), value.to(torch.bfloat16), dithered.to(torch.bfloat16))


def step_seed(counter: torch.Tensor) -> torch.Tensor:
    """The step's base seed (0-d int64) from the optimizer's fp64 rounding-step counter."""
    return mix32((counter.to(torch.int64) * 0x2545F491) & _MASK32)


def tensor_seed(base: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Seeds of the tensors at ``flat_index`` (positions among all parameters) for a step's base seed."""
    return mix32(base ^ ((flat_index.to(base.device) * 0x27D4EB2F) & _MASK32))
