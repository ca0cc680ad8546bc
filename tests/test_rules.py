"""A method's scalar rule is one Python function, run by the torch backend on 0-d tensors and compiled
into the fused backends' rule kernels (``lrfree.scalar_math``). Here both runs of each rule are compared
on the edge cases a trajectory rarely visits — a zero or tiny gradient, a loss below the lower bound, an
infinite cap, non-finite statistics — and the kernel's own duties are checked: it commits the new state
only when the step is accepted, and counts the step as taken or skipped.
"""

import itertools
import math

import pytest
import torch

import lrfree
from lrfree.kernels import sgd

F64 = torch.float64
INF = math.inf

# (loss, Σg², a, b, steps): the Polyak family's rule inputs
POLYAK_INPUTS = [
    (3.0, 2.5, 0.7, 1.5, 4.0), (3.0, 0.0, 0.7, 1.5, 0.0), (3.0, 1e-20, 0.7, 1.5, 9.0), (-1.0, 2.5, 0.7, 1.5, 2.0),
    (0.0, 2.5, INF, 0.0, 0.0), (1e-3, 1e6, 0.7, 1.5, 100.0), (2.0, 2.5, INF, INF, 1.0),
]
POLYAK_CONFIGS = [
    (lrfree.SPS, {}), (lrfree.SPS, {"adapt_flag": "constant", "eta_max": 0.8}), (lrfree.SPS, {"reference_quirks": True}),
    (lrfree.SPS, {"adapt_flag": "constant", "reference_quirks": True}), (lrfree.SPS, {"f_star": 0.5}),
    (lrfree.DecSPS, {}), (lrfree.DecSPS, {"decay": "linear", "lower_bound": 0.5}), (lrfree.AdaSPS, {}),
    (lrfree.AdaSPS, {"lower_bound": 1.0}), (lrfree.InexactPolyak, {"T": 100}),
    (lrfree.InexactPolyak, {"T": 100, "best_iterate": True, "lower_bound": -0.5}),
]


def _polyak(cls, kwargs):
    return cls([torch.zeros(3, requires_grad=True)], backend="triton", **kwargs)


def _store(opt, a, b, steps):
    opt._sync_store()
    names = (opt.rule_state + ("steps", "steps"))[:2]
    for name, value in zip(names, (a, b)):
        opt.S[name].fill_(value)
    opt.S["steps"].fill_(steps)
    opt.S["skipped"].fill_(0.0)
    return names


def _torch_rule(opt, loss, grad_sq):
    new = opt._rule(torch.tensor(loss, dtype=F64), torch.tensor(grad_sq, dtype=F64))
    return {k: float(v) for k, v in new.items()}


def _kernel_rule(opt, loss, grad_sq, *, guard=True, found_inf=None):
    """One launch of the Polyak rule kernel on a one-tensor step with this Σg²; returns the store after it,
    the accept flag and the rule's flag, and the tensor's coefficient."""
    class Batch:  # what polyak_rule reads of a step
        items = [None]
        device = torch.device("cpu")
        optimizer = opt
        inputs = type("Inputs", (), {"loss": torch.tensor(loss, dtype=F64)})()
        ok_i32 = None

        def __init__(self):
            self.found_inf = found_inf

        def vector(self, values):
            return opt._coefficient_vector(tuple(values))

        def per_item(self, key):
            return self.vector([float(opt.param_groups[0][key])])

    opt.skip_nonfinite = guard
    batch = Batch()
    coef, flag = sgd.polyak_rule(opt, batch, torch.tensor([grad_sq], dtype=F64))
    return ({k: float(v) for k, v in opt.S.items()}, int(batch.ok_i32), int(flag), float(coef[0]))


def _same(x, y):
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-14, abs_tol=0.0)


@pytest.mark.parametrize("cls,kwargs", POLYAK_CONFIGS, ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "default")
def test_polyak_rules_agree_on_torch_and_in_the_kernel(cls, kwargs):
    for loss, grad_sq, a, b, steps in POLYAK_INPUTS:
        opt = _polyak(cls, kwargs)
        names = _store(opt, a, b, steps)
        expected = _torch_rule(opt, loss, grad_sq)
        store, ok, flag, coef = _kernel_rule(opt, loss, grad_sq)
        case = (loss, grad_sq, a, b, steps)
        assert ok == 1, case
        for name in ("step_size",) + tuple(opt.rule_state):
            assert _same(store[name], expected[name]), (case, name, store[name], expected[name])
        assert flag == int(expected["flag"]), case
        assert _same(coef, expected["step_size"] * opt.param_groups[0]["lr"]), case
        assert store["steps"] == steps + 1 and store["skipped"] == 0, case
        if "steps" in names:  # a stand-in slot: the counter is only counted, never overwritten
            assert store["steps"] == steps + 1


@pytest.mark.parametrize("loss,grad_sq,found_inf,guard,taken", [
    (3.0, INF, None, True, False), (INF, 2.0, None, True, False), (math.nan, 2.0, None, True, False),
    (3.0, 2.0, torch.tensor(1.0), True, False), (3.0, 2.0, torch.tensor(0.0), True, True),
    (3.0, 2.0, torch.tensor(1.0), False, False), (3.0, INF, None, False, True),
])
def test_the_rule_kernel_decides_commits_and_counts(loss, grad_sq, found_inf, guard, taken):
    opt = _polyak(lrfree.SPS, {})
    _store(opt, 0.7, 0.0, 5.0)
    before = {k: float(v) for k, v in opt.S.items()}
    store, ok, flag, _ = _kernel_rule(opt, loss, grad_sq, guard=guard, found_inf=found_inf)
    assert ok == int(taken)
    assert store["steps"] == 5.0 + taken and store["skipped"] == float(not taken)
    if not taken:
        assert flag == 0
        for name in ("step_size", "smooth_ref"):
            assert store[name] == before[name]
