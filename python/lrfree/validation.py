"""Hyperparameter validation, in one place for every optimizer.

Each optimizer declares a table ``{name: Check}``; :func:`validate_group` applies it to every param
group (defaults and per-group overrides alike), so a bad value is reported with the optimizer, the
group and the hyperparameter's name before anything touches a tensor.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _anything(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class Check:
    """A predicate on one hyperparameter plus the phrase that explains it in an error.

    A value of the wrong kind (a string where a number belongs) raises ``TypeError``; a value of the
    right kind but out of range (negative, NaN, beta >= 1) raises ``ValueError``.
    """

    test: Callable[[Any], bool]
    expects: str
    accepts_type: Callable[[Any], bool] = _anything

    def __call__(self, where: str, name: str, value: Any) -> None:
        if not self.accepts_type(value):
            raise TypeError(f"{where}: invalid {name}={value!r}; expected {self.expects}")
        if not self.test(value):
            raise ValueError(f"{where}: invalid {name}={value!r}; expected {self.expects}")


def real(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
         allow_inf: bool = False) -> Check:
    """A finite (or, with ``allow_inf``, +inf) real number in the given interval."""

    def test(v: Any) -> bool:
        if not _is_real(v) or math.isnan(v):
            return False
        if math.isinf(v) and not (allow_inf and v > 0):
            return False
        above = v > lo if lo_open else v >= lo
        below = v < hi if hi_open else v <= hi
        return above and below

    lo_s = "(" if lo_open else "["
    hi_s = ")" if hi_open or math.isinf(hi) else "]"
    return Check(test, f"a real number in {lo_s}{lo:g}, {hi:g}{hi_s}", _is_real)


NONNEG = real(0.0)
POSITIVE = real(0.0, lo_open=True)
POSITIVE_OR_INF = real(0.0, lo_open=True, allow_inf=True)
GROWTH = Check(lambda v: not math.isnan(v) and v >= 1.0, "a real number >= 1 (inf allowed)", _is_real)
UNIT_INTERVAL = real(0.0, 1.0, hi_open=True)
ANY_REAL = real()
BOOL = Check(_anything, "True or False", lambda v: isinstance(v, bool))


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check.test(v), f"None or {check.expects}",
                 lambda v: v is None or check.accepts_type(v))


def integer(lo: int = 0) -> Check:
    return Check(lambda v: v >= lo, f"an integer >= {lo}",
                 lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool))


def choice(*options: Any) -> Check:
    return Check(lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


def betas(n: int = 2) -> Check:
    """A tuple of ``n`` decay rates, each in [0, 1)."""
    return Check(
        lambda v: len(v) == n and all(UNIT_INTERVAL.test(b) for b in v),
        "a pair of decay rates in [0, 1), as a tuple such as (0.9, 0.999)" if n == 2
        else f"{n} decay rates in [0, 1), as a tuple",
        lambda v: isinstance(v, (tuple, list)) and all(_is_real(b) for b in v),
    )


def as_tuple(value: Any) -> Any:
    """A list or tuple hyperparameter (``betas``) as a tuple; anything else unchanged, so that the
    group's check reports it by name (``betas=0.9`` is a TypeError saying what to pass, not Python's
    "'float' object is not iterable")."""
    return tuple(value) if isinstance(value, (tuple, list)) else value


def lr_value(where: str, lr: Any) -> Any:
    """``lr`` as the step reads it: a 1-element CPU tensor of any shape (torch.optim's "tensor lr", which
    schedulers update in place and torch.compile treats as an input, not a constant) becomes its float;
    anything else is returned as it is. A device tensor is refused: reading it every step would
    synchronize."""
    if not isinstance(lr, torch.Tensor):
        return lr
    if lr.is_complex() or not lr.is_floating_point():
        raise TypeError(f"{where}: invalid lr; a tensor lr must be a real floating-point tensor, got {lr.dtype}")
    if lr.numel() != 1:
        raise ValueError(f"{where}: invalid lr; a tensor lr must have exactly 1 element (0-d, as "
                         f"torch.tensor(1e-3)), got shape {tuple(lr.shape)}")
    if lr.device.type != "cpu":
        raise ValueError(f"{where}: lr is a tensor on {lr.device}; lrfree reads lr on the host at every step, "
                         "so keep a tensor lr on the CPU (torch.tensor(value)) where reading it never synchronizes")
    return float(lr)


def validate_group(owner: str, index: int | None, group: Mapping[str, Any], checks: Mapping[str, Check]) -> None:
    where = owner if index is None else f"{owner} param_groups[{index}]"
    for name, check in checks.items():
        if name in group:
            value = lr_value(where, group[name]) if name == "lr" else group[name]
            check(where, name, value)


def param_label(group: Mapping[str, Any], group_index: int, param_index: int, p: torch.Tensor) -> str:
    """How an error message names a parameter: its module path when the user passed named parameters."""
    names = group.get("param_names")
    where = f"param_groups[{group_index}]['params'][{param_index}]"
    if names is not None:
        where = f"{names[param_index]!r} ({where})"
    return f"{where} of shape {tuple(p.shape)}"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# complex parameters are stepped as their real view (lrfree.distributed.local_real), of these dtypes
COMPLEX_DTYPES = (torch.complex32, torch.complex64, torch.complex128)


def real_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype the step sees: a complex parameter's real view has the dtype of its parts."""
    return p.real.dtype if p.is_complex() else p.dtype


def validate_param(owner: str, group: Mapping[str, Any], group_index: int, param_index: int,
                   p: torch.Tensor) -> None:
    label = param_label(group, group_index, param_index, p)
    if p.dtype not in FLOAT_DTYPES + COMPLEX_DTYPES:
        raise TypeError(f"{owner}: {label} has dtype {p.dtype}; expected one of float16, bfloat16, float32, "
                        "float64 (or complex32/64/128, stepped as real pairs)")
    if p.is_sparse:
        raise TypeError(f"{owner}: {label} is a sparse tensor; lrfree optimizes dense tensors only")
