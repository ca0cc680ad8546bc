"""How optimizer state is stored: the dtype of every state tensor, and how a step writes a low-precision one.

The choice is made here and nowhere else; a method's math (torch reference and kernels alike) loads state
into its compute dtype and hands new values to a store that rounds them (``Chunk.commit_state``,
``kernels.rounding.to_state``), so it never sees the format.

* By default state is fp32 (fp64 for fp64 parameters), whatever the parameter dtype.
* ``state_dtype=torch.bfloat16`` stores a method's per-element statistics (``low_precision_state``: Adam's
  moments, D-Adaptation's and Prodigy's ``s``, COCOB's sums ...) in bf16: 2 bytes per element instead of 4.
  Anchors (``x0``, Prodigy's ``p0``, the best iterate) keep the parameter's dtype, since the step reads
  distances from them, and fp64 parameters keep fp64 state: asking for fp64 parameters asks for their
  precision.
* A bf16 state tensor is written by stochastic rounding: the fp32 value's low 16 bits are dithered and
  truncated, so the stored value is unbiased (E[stored] = value), and an EMA update ``β v + (1 − β) g²``
  smaller than v's rounding step still moves v on average instead of never (round to nearest freezes v
  once ``(1 − β2)(g² − v)`` falls below half of v's rounding step, 2⁻⁹ v). The price is noise: each
  write adds an error of at most one rounding step, so an EMA keeps a random walk of standard deviation
  ≤ (step / 2) / √(1 − β²) around the fp32 value, and a running sum (COCOB's, D-Adaptation's s) one that
  grows as √(steps). The dither bits are the parameters' own counter-based hash (``kernels.rounding``),
  drawn with a seed per (step, tensor, state key): the torch reference and the fused kernels round the
  same value to the same bits, and a step is reproducible.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

#: what ``state_dtype`` accepts
SUPPORTED = (torch.float32, torch.bfloat16)


def validate(owner: str, value: Any) -> torch.dtype:
    """The ``state_dtype`` option: None or torch.float32 (the default), or torch.bfloat16."""
    if value is None:
        return torch.float32
    if value not in SUPPORTED:
        raise ValueError(f"{owner}: state_dtype={value!r} is not supported; use torch.float32 (the default) or "
                         "torch.bfloat16 (per-element statistics stored in bf16 with stochastic rounding)")
    return value


def default_dtype(p: torch.Tensor) -> torch.dtype:
    """State dtype without ``state_dtype``: fp32 for fp32/bf16/fp16 parameters and fp64 for fp64 ones."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def storage_dtype(state_dtype: torch.dtype, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype the statistics of a parameter of ``param_dtype`` are stored in under ``state_dtype``."""
    return torch.float64 if param_dtype == torch.float64 else state_dtype


def state_dtype_of(opt: Any) -> torch.dtype:
    """``opt``'s ``state_dtype`` (fp32 for an optimizer pickled before the option existed)."""
    return getattr(opt, "state_dtype", torch.float32)


def store(opt: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new parameter's state (``init_state``'s, in the default dtypes) in the dtypes ``opt`` keeps it in:
    its ``low_precision_state`` keys converted to their :func:`storage_dtype`."""
    target = state_dtype_of(opt)
    if target == torch.float32:
        return state
    keys = type(opt).low_precision_state
    return {k: v.to(storage_dtype(target, v.dtype)) if k in keys else v for k, v in state.items()}


def rounds_state(opt: Any) -> bool:
    """Whether ``opt``'s steps store some state by stochastic rounding (and so need the step's seeds)."""
    return state_dtype_of(opt) != torch.float32 and bool(type(opt).low_precision_state)


def salt(key: str) -> int:
    """The state key's seed salt (< 2³¹): the key's stream of dither bits differs from the parameter's and
    from the other keys' of the same tensor. Derived from the name, so the reference and the kernels agree
    without a table (the kernels bind it as a compile-time constant per slot)."""
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


def state_bytes(method: type, state_dtype: torch.dtype, **options: Any) -> float:
    """Bytes of state per element of an fp32 parameter for ``method(**options)`` under ``state_dtype`` (the
    README's methods table)."""
    p = torch.nn.Parameter(torch.zeros(1024))
    opt = method([p], state_dtype=state_dtype, **options)
    state = opt._new_state(p, opt.param_groups[0])
    return sum(v.element_size() * v.numel() for v in state.values()) / p.numel()
