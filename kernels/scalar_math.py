"""The Triton side of ``lrfree.scalar_math``: the functions a scalar rule calls, compiled, and what
every rule kernel shares — the accept decision, totals over a step's per-tensor statistics, predicated
writes of the scalar store and the step counters.

A rule kernel is one program: it loads the step's reduced statistics and the method's scalar state,
calls the method's rule (``fused(rule)``, the same Python function the torch backend runs), and writes
the new state where the step is accepted, the accept flag the apply pass reads, and the apply pass's
coefficients. Everything is fp64, as the torch backend's 0-d tensors are.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

F64 = torch.float64
# lanes of a rule kernel's loops over a step's tensors (a model has 10²–10⁴ of them); a constexpr, since
# Triton's compiler rejects reads of plain module globals in a jit function (its interpreter allows them)
LANES = tl.constexpr(1024)


@triton.jit
def where(cond, a, b):
    return tl.where(cond, a, b)


@triton.jit
def minimum(a, b):
    return tl.minimum(a, b)


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def sqrt(a):
    return tl.sqrt(a)


@triton.jit
def abs(a):  # noqa: A001 - the name a rule calls (M.abs)
    return tl.abs(a)


@triton.jit
def isfinite(a):
    return (a == a) & (tl.abs(a) != float("inf"))


@triton.jit
def pow(base, exponent):  # noqa: A001 - M.pow
    # exp(e·log b): fp64 exp and log compile on every target and run in the interpreter (libdevice's pow
    # does not); b = 0 gives exp(-inf) = 0, and e = 0 is 1 (0 · log 0 would be NaN)
    return tl.where(exponent == 0, 1.0, tl.exp(exponent * tl.log(base.to(tl.float64))))


@triton.jit
def at(vector, i):
    return tl.load(vector + i)


@triton.jit
def safe_div(num, den, fallback):
    return tl.where(den > 0, num / tl.where(den > 0, den, 1.0), fallback)


def rule_kernel(fn):
    """``triton.jit`` for a rule kernel. A rule kernel is Triton on every fused backend: ``backend="cuda"``
    runs its element-wise passes in the compiled extension and these one-program launches in Triton (the
    rule is the method's Python function; there is no C++ copy of it), see ``backends.cuda_ext.Launcher``."""
    kernel = triton.jit(fn)
    kernel.lrfree_rule = True
    return kernel


def fused(rule):
    """``rule`` (a function of ``lrfree.scalar_math`` style) as a Triton function: the same code, with
    ``M`` bound to this module. Call it from a rule kernel."""
    namespace = dict(rule.__globals__)
    namespace["M"] = _THIS
    namespace["tl"] = tl  # the interpreter looks for triton.language among a jit function's globals
    for name in rule.__code__.co_names:  # module constants (thresholds ...) are compile-time values
        value = namespace.get(name)
        if isinstance(value, (bool, int, float)):
            namespace[name] = tl.constexpr(value)
    twin = types.FunctionType(rule.__code__, namespace, rule.__name__, rule.__defaults__, rule.__closure__)
    twin.__module__, twin.__qualname__, twin.__doc__ = rule.__module__, rule.__qualname__, rule.__doc__
    return triton.jit(twin)


_THIS = types.ModuleType("lrfree_scalar_math_fused")
for _name in ("where", "minimum", "maximum", "sqrt", "abs", "isfinite", "pow", "at", "safe_div"):
    setattr(_THIS, _name, globals()[_name])


# ------------------------------------------------------------------------------- what rule kernels share
@triton.jit
def column_total(stats, n, col, K: tl.constexpr):
    """Σ over the rows of column ``col`` of an (n, K) fp64 matrix of per-tensor statistics, in a fixed
    order (lanes, then a fixed tree): the fused twin of ``StepBatch.reduce``."""
    acc = tl.zeros((LANES,), dtype=tl.float64)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        acc += tl.load(stats + idx * K + col, mask=idx < n, other=0.0).to(tl.float64)
        i0 += LANES
    return tl.sum(acc, axis=0)


@triton.jit
def column_max(stats, n, col, K: tl.constexpr):
    """max over the rows of column ``col`` (-inf for no rows)."""
    acc = tl.full((LANES,), float("-inf"), dtype=tl.float64)
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        acc = tl.maximum(acc, tl.load(stats + idx * K + col, mask=idx < n, other=float("-inf")).to(tl.float64))
        i0 += LANES
    return tl.max(acc, axis=0)


@triton.jit
def accept(witness, loss, found_inf, GUARD: tl.constexpr, HAS_LOSS: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """Whether the step is taken: the fp64 ``witness`` (a sum over every gradient element) and the loss
    are finite (under ``GUARD``, i.e. skip_nonfinite), and GradScaler found no inf (``found_inf``, when
    given). The fused twin of ``FusedOptimizer._fused_step``'s decision."""
    if GUARD:
        ok = isfinite(witness)
        if HAS_LOSS:
            ok = ok & isfinite(tl.load(loss).to(tl.float64))
    else:
        ok = (witness == witness) | (witness != witness)  # true
    if HAS_FOUND_INF:
        ok = ok & (tl.load(found_inf).to(tl.float64) == 0)
    return ok


@triton.jit
def commit(ptr, value, ok):
    """``*ptr = value`` if the step is accepted, else leave it."""
    tl.store(ptr, tl.where(ok, value, tl.load(ptr)))


@triton.jit
def finish(ok, taken, ok_out, steps, skipped):
    """The end of every rule kernel: the accept flag for the apply pass (int32), ``skipped`` counts a
    rejected step and ``steps`` a taken one (``taken``: accepted, and for some methods more)."""
    tl.store(ok_out, ok.to(tl.int32))
    tl.store(skipped, tl.load(skipped) + tl.where(ok, 0.0, 1.0))
    tl.store(steps, tl.load(steps) + tl.where(taken, 1.0, 0.0))


@triton.jit
def scale_vector(out, vector, n, value):
    """out[i] = vector[i] · value for the n entries (every tensor's coefficient lr_i · η)."""
    i0 = 0
    while i0 < n:
        idx = i0 + tl.arange(0, LANES)
        inside = idx < n
        tl.store(out + idx, tl.load(vector + idx, mask=inside, other=0.0) * value, mask=inside)
        i0 += LANES


def step_inputs(batch) -> dict:
    """The rule kernel arguments every method passes: the loss and GradScaler's found-inf flag (a
    stand-in pointer where absent), their flags, the output accept flag, and the two counters."""
    opt = batch.optimizer
    loss, found_inf = batch.inputs.loss, batch.found_inf
    store = opt.S
    ok_out = batch.ok_i32 = torch.empty((), dtype=torch.int32, device=batch.device)
    return dict(loss=store["steps"] if loss is None else loss,
                found_inf=store["steps"] if found_inf is None else found_inf,
                ok_out=ok_out, steps=store["steps"], skipped=store["skipped"],
                GUARD=opt.skip_nonfinite, HAS_LOSS=loss is not None, HAS_FOUND_INF=found_inf is not None)
