"""How the apply passes store a parameter: round to nearest even, or stochastic rounding to bf16.

Stochastic rounding (``stochastic_rounding=True``) keeps pure-bf16 training unbiased: an update smaller
than a bf16 ulp moves the parameter with the probability it would have moved it, instead of never. The
fp32 result's low 16 bits are dithered by 16 random bits and truncated, which rounds the magnitude up
with probability (remainder / ulp). The bits are a counter-based hash of (step seed of the tensor,
element index), so a step is reproducible, needs no RNG state on the device, and the torch reference
(``lrfree.backends.torch_ref.stochastic_round_bf16``) draws exactly the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# 32-bit integer mixer (two multiply-xorshift rounds); both constants are < 2^31, so the torch reference can
# reproduce it in int64 arithmetic without overflow.
MIX = 0x45D9F3B


@triton.jit
def mix32(x):
    x = (x ^ (x >> 16)) * 0x45D9F3B
    x = (x ^ (x >> 16)) * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit
def to_param(value, X: tl.constexpr, SR: tl.constexpr, sr_seeds, t, offs):
    """``value`` (fp32/fp64 compute) as the parameter dtype ``X`` — stochastically rounded under ``SR``
    with tensor ``t``'s seed; ``offs`` are the elements' indices in the tensor."""
    if SR:
        seed = tl.load(sr_seeds + t).to(tl.uint32)
        bits = mix32(offs.to(tl.uint32) ^ seed) & 0xFFFF
        raw = value.to(tl.float32).to(tl.uint32, bitcast=True)
        dithered = ((raw + bits) & 0xFFFF0000).to(tl.float32, bitcast=True)
        # NaN keeps its round-to-nearest value (dithering could carry a NaN's payload into the sign bit)
        return tl.where(value != value, value.to(X), dithered.to(X))
    else:
        return value.to(X)


def rounding(batch, group) -> dict:
    """The keyword arguments every apply kernel takes for ``to_param``."""
    seeds = batch.sr_seeds
    if seeds is None or group.dtype != torch.bfloat16:
        return {"sr_seeds": group.geo.numels, "SR": False}  # any int64 pointer: never read
    return {"sr_seeds": group.take(seeds), "SR": True}
