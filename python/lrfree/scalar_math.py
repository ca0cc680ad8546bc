"""Scalar rules written once and run two ways.

A method's scalar rule (the step size from the step's reduced statistics, the new scalar state, the
accept decision) is a plain Python function of 0-d values that does its math with the arithmetic
operators and the functions of ``M`` below. The torch backend (and any step under data parallelism)
calls it with 0-d fp64 device tensors: ``M`` is torch. A fused backend calls the same function inside
the method's one-program *rule kernel*, where ``lrfree.kernels.scalar_math.fused`` has compiled it
with ``M`` bound to Triton (``lrfree.kernels.scalar_math``): the rule is a handful of fp64 scalar
instructions in one launch instead of dozens of 0-d torch ops, each a launch of its own on a GPU.

So a rule may use: ``+ - * /``, comparisons, ``&``/``|`` on masks, ``M.where/minimum/maximum/sqrt/abs/
isfinite/pow/safe_div``, ``M.at(vector, i)`` for entry i (a Python int) of an fp64 vector of host coefficients,
and Python ``if`` on *compile-time* flags only (host booleans, passed as Triton constexprs). It must not
read a device value on the host, which would be a sync in the torch call and cannot compile in the
fused one.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=F64)


class M:
    """The torch twin of ``lrfree.kernels.scalar_math`` (same names, same meaning)."""

    @staticmethod
    def where(cond, a, b):
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = torch.full_like(cond, float(a), dtype=F64)  # a device fill: no host-to-device copy
        return torch.where(cond, a, b)

    @staticmethod
    def minimum(a, b):
        if not isinstance(b, torch.Tensor):
            return a.clamp_max(b)
        if not isinstance(a, torch.Tensor):
            return b.clamp_max(a)
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a, b):
        if not isinstance(b, torch.Tensor):
            return a.clamp_min(b)
        if not isinstance(a, torch.Tensor):
            return b.clamp_min(a)
        return torch.maximum(a, b)

    @staticmethod
    def sqrt(a):
        return torch.sqrt(a)

    @staticmethod
    def abs(a):
        return torch.abs(a)

    @staticmethod
    def isfinite(a):
        return torch.isfinite(a)

    @staticmethod
    def pow(base, exponent):
        """base ** exponent for base >= 0 (1 where exponent is 0)."""
        return torch.pow(base, exponent)

    @staticmethod
    def at(vector, i: int):
        return vector[i]

    @staticmethod
    def safe_div(num, den, fallback):
        """``num / den`` where ``den > 0``, else ``fallback``."""
        positive = den > 0
        quotient = num / torch.where(positive, den, torch.ones_like(den))
        return M.where(positive, quotient, fallback)
