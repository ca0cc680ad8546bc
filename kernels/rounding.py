"""How the apply passes store a parameter: round to nearest even, or stochastic rounding to bf16.

Stochastic rounding (``stochastic_rounding=True``) keeps pure-bf16 training unbiased: an update smaller
than a bf16 ulp moves the parameter with the probability it would have moved it, instead of never. The
fp32 result's low 16 bits are dithered by 16 random bits and truncated, which rounds the magnitude up
with probability (remainder / ulp). The bits are a counter-based hash of (step seed of the tensor,
element index), so a step is reproducible, needs no RNG state on the device, and the torch reference
(``lrfree.backends.torch_ref.stochastic_round_bf16``) and the compiled extension (``csrc/kernels.cuh``) draw
exactly the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lrfree import precision

from .scalar_math import LANES, rule_kernel

# 32-bit integer mixer (two multiply-xorshift rounds); both constants are < 2^31, so the torch reference can
# reproduce it in int64 arithmetic without overflow.
MIX = 0x45D9F3B


@triton.jit
def mix32(x):
    x = (x ^ (x >> 16)) * 0x45D9F3B
    x = (x ^ (x >> 16)) * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit
def _stochastic_bf16(value, seed, offs):
    """``value`` stochastically rounded to bf16 with the dither of ``seed`` (uint32) at element indices ``offs``."""
    bits = mix32(offs.to(tl.uint32) ^ seed) & 0xFFFF
    raw = value.to(tl.float32).to(tl.uint32, bitcast=True)
    dithered = ((raw + bits) & 0xFFFF0000).to(tl.float32, bitcast=True)
    # NaN keeps its round-to-nearest value (dithering could carry a NaN's payload into the sign bit)
    return tl.where(value != value, value.to(tl.bfloat16), dithered.to(tl.bfloat16))


@triton.jit
def to_param(value, X: tl.constexpr, SR: tl.constexpr, sr_seeds, t, offs):
    """``value`` (fp32/fp64 compute) as the parameter dtype ``X`` — stochastically rounded under ``SR``
    with tensor ``t``'s seed; ``offs`` are the elements' indices in the tensor."""
    if SR:
        return _stochastic_bf16(value, tl.load(sr_seeds + t).to(tl.uint32), offs)
    else:
        return value.to(X)


@triton.jit
def to_state(value, S: tl.constexpr, sr_seeds, t, offs, SALT: tl.constexpr):
    """``value`` (compute dtype) as state stored in ``S`` (lrfree.precision): bf16 by stochastic rounding
    with tensor ``t``'s seed salted by the state key's ``SALT``, else converted (fp32/fp64: exact)."""
    if S == tl.bfloat16:
        return _stochastic_bf16(value, mix32(tl.load(sr_seeds + t).to(tl.uint32) ^ SALT), offs)
    else:
        return value.to(S)


@rule_kernel
def _seeds_kernel(counter, flat, out, n):
    """The step's seed of each of the ``n`` tensors at positions ``flat`` (``torch_ref.step_seed`` of the fp64
    ``counter``, then ``torch_ref.tensor_seed``; uint32 products wrap as the reference's masked int64 ones),
    and the counter's advance, in one program."""
    count = tl.load(counter)
    base = mix32(count.to(tl.int64).to(tl.uint32) * 0x2545F491)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        k = tl.load(flat + idx, mask=inside, other=0).to(tl.uint32)
        tl.store(out + idx, mix32(base ^ (k * 0x27D4EB2F)).to(tl.int64), mask=inside)
        i0 += LANES
    tl.store(counter, count + 1.0)


def tensor_seeds(batch, counter: torch.Tensor) -> torch.Tensor:
    """(items,) int64: every tensor's stochastic-rounding seed for this step, as the reference draws them,
    and the rounding counter advanced: one launch where the reference spends ~25 small torch ops."""
    from .multi_tensor import launch
    out = torch.empty(len(batch.items), dtype=torch.int64, device=batch.device)
    launch(_seeds_kernel, (1,), counter, batch.index(it.flat_index for it in batch.items), out, len(batch.items))
    return out


def salt(key: str) -> tl.constexpr:
    """A state key's seed salt (lrfree.precision.salt) as a kernel constant."""
    return tl.constexpr(precision.salt(key))


SALT_EXP_AVG = salt("exp_avg")
SALT_EXP_AVG_SQ = salt("exp_avg_sq")
SALT_MAX_EXP_AVG_SQ = salt("max_exp_avg_sq")
SALT_S = salt("s")


def rounding(batch, group, params: bool = True, state: bool = False) -> dict:
    """The keyword arguments of a kernel that stores parameters (``to_param``: sr_seeds, SR) and/or state
    (``to_state``: sr_seeds, S, the state's storage dtype)."""
    seeds = batch.sr_seeds
    out = {"sr_seeds": group.geo.numels if seeds is None else group.take(seeds)}  # None: any int64, never read
    if params:
        out["SR"] = seeds is not None and batch.optimizer.stochastic_rounding and group.dtype == torch.bfloat16
    if state:
        out["S"] = group.state_tl
    return out
