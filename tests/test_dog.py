"""DoG / LDoG's fused step: the statistics pass (‖g + λx‖², ‖x − x0‖² per tensor, nothing written) is also
the non-finite guard, so a steady-state step is that pass and the SGD apply pass — no Σg² pass of its own
(bench/roofline.py FUSED: 24 B per element in fp32) — and a non-finite gradient still skips the step with
parameters, x0 and every step scalar bit-identical."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lrfree
from lrfree.kernels import aot

METHODS = [lrfree.DoG, lrfree.LDoG]
SIZES = (64 * 48, 37)  # one aligned tensor (128-bit accesses) and one that is not: two launches per pass
REDUCE = "multi_tensor._segment_reduce_kernel"


def _run(cls, weight_decay: float, steps: int, skip_nonfinite: bool = True):
    """Two param groups (DoG: two segments), fp32, fused; returns (params, optimizer)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]
    opt = cls([{"params": params[:1]}, {"params": params[1:]}], weight_decay=weight_decay, backend="triton",
              skip_nonfinite=skip_nonfinite)
    for t in range(steps):
        _set_grads(params, t)
        opt.step()
    return params, opt


def _set_grads(params, t: int) -> None:
    gen = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def _launches(cls, weight_decay: float, skip_nonfinite: bool = True) -> list[list[str]]:
    """The kernels of three recorded steps (CPU tensors: nothing runs)."""
    with aot.recording() as rec:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in SIZES]
        opt = cls([{"params": params[:1]}, {"params": params[1:]}], weight_decay=weight_decay,
                  backend="triton", skip_nonfinite=skip_nonfinite)
        steps = []
        for t in range(3):
            _set_grads(params, t)
            first = len(rec.launches)
            opt.step()
            steps.append([launch.name for launch in rec.launches[first:]])
    return steps


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_steady_state_step_is_the_stats_pass_and_the_apply_pass(cls, weight_decay):
    steady = _launches(cls, weight_decay)[-1]
    assert "common._sumsq_kernel" not in steady
    assert [name for name in steady if name != REDUCE] == ["dog._dog_stats_kernel"] * 2 + ["sgd._sgd_apply_kernel"] * 2
    # the guard costs no launch at all
    assert steady == _launches(cls, weight_decay, skip_nonfinite=False)[-1]


def _snapshot(params, opt):
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    scalars = {k: v for k, v in opt.scalars().items() if k != "skipped"}
    return [p.detach().clone() for p in params], state, scalars


@pytest.mark.parametrize("where", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_a_nonfinite_gradient_skips_the_fused_step_bit_for_bit(cls, weight_decay, bad, where):
    params, opt = _run(cls, weight_decay, steps=2)
    before = _snapshot(params, opt)
    _set_grads(params, 2)
    params[where].grad[5] = bad
    opt.step()
    after = _snapshot(params, opt)
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for sa, sb in zip(before[1], after[1]):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for k in before[2]:
        assert torch.equal(before[2][k], after[2][k]), k
    assert float(opt.scalars()["skipped"]) == 1.0
    # the next finite step goes on from the untouched state exactly as a run that never saw the bad batch
    _set_grads(params, 3)
    opt.step()
    ref_params, ref = _run(cls, weight_decay, steps=2)
    _set_grads(ref_params, 3)
    ref.step()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)


def test_ldog_resumed_under_master_weights_keeps_x0_norm():
    """LDoG's ‖x0‖ (one per tensor) is recomputed after a load from the saved x0; under master_weights (and
    FSDP2) the tensor a step updates is not the parameter that keys the state, and the current value was
    taken instead of x0."""
    def make(params):
        return lrfree.LDoG(params, master_weights=True, backend="torch")

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen).bfloat16() for n in (12, 5)]
    grads = [[torch.randn(n, generator=gen).bfloat16() for n in (12, 5)] for _ in range(4)]
    runs = []
    for resume in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for t, step_grads in enumerate(grads):
            if resume and t == 2:
                saved = copy.deepcopy(opt.state_dict())
                opt = make(params)
                opt.load_state_dict(saved)
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        runs.append((params, opt.scalars()))
    (uninterrupted, expected), (resumed, got) = runs
    assert all(torch.equal(p, q) for p, q in zip(uninterrupted, resumed))
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
