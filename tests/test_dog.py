"""DoG / LDoG's fused step: the statistics pass (‖g + λx‖², ‖x − x0‖² per tensor, nothing written) is also
the non-finite guard, so a steady-state step is that pass and the SGD apply pass — no Σg² pass of its own
(bench/roofline.py FUSED: 24 B per element in fp32), with the one-program rule kernel between them — and a
non-finite gradient still skips the step with parameters, x0 and every step scalar bit-identical."""

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
    # two launches per element-wise pass (SIZES), and between them the one-program rule kernel
    assert [name for name in steady if name != REDUCE] == (["dog._dog_stats_kernel"] * 2 + ["dog._dog_rule_kernel"]
                                                            + ["sgd._sgd_apply_kernel"] * 2)
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


# ------------------------------------------------------------------------------- the rule, torch and kernel
# per segment (t, r̄, G, ‖x0‖, ‖g + λx‖², ‖x − x0‖²): a first step, a distance beyond r̄ and one within it,
# a zero G (η from the guarded division: 0), a vanishing distance
RULE_INPUTS = [(0.0, 0.0, 0.0, 2.5, 1.5, 0.0), (3.0, 0.5, 2.0, 2.5, 1.5, 4.0), (3.0, 0.5, 2.0, 2.5, 0.0, 0.01),
               (0.0, 0.0, 0.0, 0.0, 0.0, 0.0), (7.0, 2.0, 0.0, 1.0, 0.0, 1e-300), (1.0, 1e-6, 1e-12, 3.0, 1e6, 9.0)]


def _rule_batch(opt, loss: float = 1.0, found_inf=None):
    """A step of ``opt`` over its parameters (all with a gradient) as the rule sees it."""
    from lrfree.optimizer import StepBatch, StepInputs
    items = opt._gather()
    opt._sync_store()
    batch = StepBatch(items, StepInputs(torch.tensor(loss, dtype=torch.float64), None), torch.device("cpu"), opt)
    batch.found_inf = found_inf
    return batch


def _segments(opt, batch):
    segments, bounds = [], []
    for i, it in enumerate(batch.items):
        if not segments or segments[-1] != opt._segment(it):
            segments.append(opt._segment(it))
            bounds.append(i)
    return segments, bounds + [len(batch.items)]


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y or math.isclose(x, y, rel_tol=1e-14, abs_tol=0.0)


@pytest.mark.parametrize("options", [{}, {"init_eta": 1e-3}, {"eps": 0.0, "lr": 0.5}],
                         ids=["default", "init_eta", "eps0-lr"])
@pytest.mark.parametrize("layout", ["groups", "tensors", "ldog"])
def test_the_rule_kernel_agrees_with_the_torch_rule(layout, options):
    """DoG's rule run by the torch backend (``DoG._rule``) and compiled into the rule kernel, on edge inputs:
    per group, its tensors' statistics summed in the kernel ("groups"); one tensor per segment, the
    kernel's vector path (DoG with a tensor per group, and LDoG), a resting distance added per segment."""
    from lrfree.kernels import dog as kernels
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(4)]
    if layout == "groups":
        opt = lrfree.DoG([{"params": params[:3]}, {"params": params[3:], "lr": 2.0}], backend="triton", **options)
    elif layout == "tensors":
        opt = lrfree.DoG([{"params": [p]} for p in params], backend="triton", **options)
    else:
        opt = lrfree.LDoG(params, backend="triton", **options)
    for p in params:
        p.grad = torch.randn(5, generator=gen)
    for shift in range(len(RULE_INPUTS)):
        batch = _rule_batch(opt)
        segments, bounds = _segments(opt, batch)
        inputs = [RULE_INPUTS[(shift + s) % len(RULE_INPUTS)] for s in range(len(segments))]
        for name, column in zip(("t", "rbar", "G", "x0_norm"), zip(*inputs)):
            opt.S[name][torch.tensor(segments)] = torch.tensor(column, dtype=torch.float64)
        opt.S["steps"].fill_(4.0)
        opt.S["skipped"].fill_(0.0)
        # each segment's statistics split over its tensors (halves, the rest on the first)
        stats = torch.zeros(len(batch.items), 2, dtype=torch.float64)
        for (a, b), row in zip(zip(bounds, bounds[1:]), inputs):
            stats[a:b] = torch.tensor(row[4:], dtype=torch.float64) / 2
            stats[a] += torch.tensor(row[4:], dtype=torch.float64) / 2
        resting = None if layout == "ldog" else torch.tensor([0.25 * s for s in range(len(segments))],
                                                             dtype=torch.float64)
        seg_index = batch.index(segments)
        groups = [batch.items[a].group for a in bounds[:-1]]
        grad_sq = torch.stack([stats[a:b, 0].sum() for a, b in zip(bounds, bounds[1:])])
        dist_sq = torch.stack([stats[a:b, 1].sum() for a, b in zip(bounds, bounds[1:])])
        expected = opt._rule(seg_index, groups, grad_sq, dist_sq if resting is None else dist_sq + resting, batch)
        coef = kernels.dog_rule(opt, batch, stats, segments, bounds, resting)
        assert int(batch.ok_i32) == 1
        for name in ("t", "rbar", "G", "eta"):
            for k, s in enumerate(segments):
                assert _same(float(opt.S[name][s]), float(expected[name][k])), (shift, name, s)
        for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
            assert all(_same(float(c), float(expected["eta"][k])) for c in coef[a:b]), (shift, k)
        assert float(opt.S["steps"]) == 5.0 and float(opt.S["skipped"]) == 0.0


@pytest.mark.parametrize("bad, found_inf, guard, taken", [
    (math.inf, None, True, False), (math.nan, None, True, False), (0.0, torch.tensor(1.0), True, False),
    (0.0, torch.tensor(0.0), True, True), (math.inf, None, False, True), (0.0, torch.tensor(1.0), False, False)])
@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_the_rule_kernel_commits_only_an_accepted_step_and_counts_it(cls, bad, found_inf, guard, taken):
    """The witness is Σ‖g + λx‖² over every tensor: non-finite, or GradScaler's flag, rejects the step (the
    first only under skip_nonfinite); a rejected step leaves every segment's state as it was."""
    from lrfree.kernels import dog as kernels
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], backend="triton", skip_nonfinite=guard)
    for p in params:
        p.grad = torch.ones(3)
    batch = _rule_batch(opt, found_inf=found_inf)
    segments, bounds = _segments(opt, batch)
    for name, value in (("t", 2.0), ("rbar", 0.5), ("G", 3.0), ("eta", 0.25), ("x0_norm", 1.0)):
        opt.S[name].fill_(value)
    before = {k: v.clone() for k, v in opt.S.items()}
    stats = torch.tensor([[1.0, 4.0], [bad, 0.0], [2.0, 0.0]], dtype=torch.float64)
    kernels.dog_rule(opt, batch, stats, segments, bounds, None)
    assert int(batch.ok_i32) == int(taken)
    assert float(opt.S["steps"]) == float(taken) and float(opt.S["skipped"]) == float(not taken)
    for name in ("t", "rbar", "G", "eta"):
        assert torch.equal(opt.S[name], before[name]) != taken, name


@pytest.mark.parametrize("layout", ["groups", "a tensor per segment"])
def test_fused_steps_with_resting_parameters_follow_the_torch_backend(layout):
    """A parameter that moved and then has no gradient for a while still counts in its group's ‖x − x0‖ (as
    in the reference, which sees a zero gradient): the rule kernel adds that resting distance, per group in
    both of its paths (several tensors per segment; one tensor per segment in this step). fp64, ≤ 1e-12."""
    def run(backend):
        gen = torch.Generator().manual_seed(4)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (40, 7, 3, 5)]
        if layout == "groups":  # the resting tensor's group keeps two tensors with a gradient
            groups = [{"params": [params[0], params[1], params[3]]}, {"params": [params[2]], "weight_decay": 0.1}]
        else:  # ... or one, beside one-tensor groups
            groups = [{"params": params[:2]}, {"params": params[2:3]}, {"params": params[3:]}]
        opt = lrfree.DoG(groups, backend=backend)
        for t in range(5):
            for i, p in enumerate(params):
                resting = i == 1 and t in (2, 3) or (layout == "groups" and i == 0 and t == 4)
                p.grad = None if resting else torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        return params, opt

    (ref, ref_opt), (fused, fused_opt) = run("torch"), run("triton")
    for a, b in zip(ref, fused):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    for name, value in ref_opt.scalars().items():
        assert torch.allclose(fused_opt.scalars()[name], value, rtol=1e-12, atol=0), name
