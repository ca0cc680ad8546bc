"""Statistics a step needs only until a device flag says they are known (``kernels.common.until_known``):
PS-DA-SGD's start pass (n0 = ‖g/α‖ and rms(α) of the first step with a non-zero gradient) and D-Adapt
SGD's ‖g0‖ without the non-finite guard.

They run as a small persistent launch — at most ``PERSISTENT_PROGRAMS`` programs, each looping over every
P-th block while the flag is unset — instead of one program per block every step. Checked here: the
statistic is the torch reference's when the first step is skipped or the first gradients are all zero
(the flag is then set a step or two later), with programs that loop over several blocks; once the flag
is set the launch writes zeros; and a steady-state step launches no full grid besides its element passes.
"""

import math

import pytest
import torch

import lrfree
from lrfree.kernels import common
from conftest import rel_err
from optimizer_db import require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# aligned (16·k elements) and odd-sized tensors: two dtype groups, whose rows share one reduction
SIZES = (4 * 2048 + 16, 2 * 2048 + 37, 33, 112)
CASES = {
    "PSDASGD": lambda g, **kw: lrfree.PSDASGD(g, weight_decay=1e-2, **kw),
    "PSDASGD-amsgrad-averaging": lambda g, **kw: lrfree.PSDASGD(g, momentum=0.9, betas=(0.0, 0.99), amsgrad=True,
                                                                  **kw),
    "PSDASGD-unscaled": lambda g, **kw: lrfree.PSDASGD(g, scaling="none", **kw),
    "DAdaptSGD": lambda g, **kw: lrfree.DAdaptSGD(g, momentum=0.9, weight_decay=1e-3, **kw),
}


def cases(names, backends=("triton", "cuda")):
    return [pytest.param(n, b, id=f"{n}-{b}") for b in backends for n in names]


def params_and_groups(per_group_d):
    g = torch.Generator().manual_seed(11)
    params = [(torch.randn(n, generator=g, dtype=torch.float64) * 0.3).to(DEVICE).requires_grad_() for n in SIZES]
    if per_group_d:
        return params, [{"params": params[:2]}, {"params": params[2:]}]
    return params, [{"params": params}]


def gradients(params, t, scenario):
    """Step t's gradients: scenario "zero" has all-zero gradients at steps 0 and 1 (group 1's stay zero one
    step longer, so that with per-group d the groups start at different steps); "skipped" has a NaN at
    step 0 (or, without the guard, GradScaler's found-inf flag)."""
    g = torch.Generator().manual_seed(100 + t)
    grads = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(DEVICE) * (1 + t) for p in params]
    if scenario == "zero":
        for i, grad in enumerate(grads):
            if t < 2 or (t == 2 and i >= 2):
                grad.zero_()
    if scenario == "skipped" and t == 0:
        grads[1].view(-1)[77] = math.nan
    return grads


def run(name, backend, scenario, guard, per_group_d, steps=5):
    params, groups = params_and_groups(per_group_d)
    opt = CASES[name](groups, backend=backend, skip_nonfinite=guard, per_group_d=per_group_d)
    history = []
    for t in range(steps):
        for p, grad in zip(params, gradients(params, t, scenario)):
            p.grad = grad
        if scenario == "skipped" and t == 0 and not guard:
            opt.found_inf = torch.ones((), device=DEVICE)  # rejected without the guard: as GradScaler does
        opt.step()
        if hasattr(opt, "found_inf"):
            del opt.found_inf
        history.append(({k: v.clone() for k, v in opt.scalars().items()}, [p.detach().clone() for p in params]))
    return history


# (scenario, guard, per-group d, programs): with 3 programs every program loops over several blocks; with
# the default count each program has one block here
SCENARIOS = [pytest.param(scenario, guard, per_group_d, 3,
                          id=f"{scenario}{'' if guard else '-noguard'}{'-per-group-d' if per_group_d else ''}")
             for per_group_d in (False, True) for scenario in ("skipped", "zero") for guard in (True, False)]
SCENARIOS += [pytest.param(scenario, True, False, common.PERSISTENT_PROGRAMS, id=f"{scenario}-default-programs")
              for scenario in ("skipped", "zero")]


@pytest.mark.parametrize("scenario, guard, per_group_d, programs", SCENARIOS)
@pytest.mark.parametrize("name, backend", cases(CASES))
def test_start_statistic_when_the_first_steps_are_skipped_or_zero(monkeypatch, name, backend, scenario, guard,
                                                                   per_group_d, programs):
    """The fused backends' n0 / ‖g0‖ (and so every later step) equal the torch reference's in fp64, when the
    flag is set only at a later step; with 3 programs every program loops over several blocks."""
    require_backend(getattr(lrfree, name.split("-")[0]), backend)
    monkeypatch.setattr(common, "PERSISTENT_PROGRAMS", programs)
    reference = run(name, "torch", scenario, guard, per_group_d)
    fused = run(name, backend, scenario, guard, per_group_d)
    # the flag is still unset after the first step (after two with zero gradients), set by the last
    assert bool((reference[1 if scenario == "zero" else 0][0]["g0_norm"] == 0).all())
    assert bool((reference[-1][0]["g0_norm"] > 0).all())
    for t, ((s_ref, x_ref), (s_fused, x_fused)) in enumerate(zip(reference, fused)):
        for key in ("g0_norm", "d", "step_size", "numerator", "skipped"):
            assert rel_err(s_fused[key], s_ref[key]) <= 1e-12, (t, key, s_fused[key], s_ref[key])
        for a, b in zip(x_fused, x_ref):
            assert rel_err(a, b) <= 1e-12, t


class Spy:
    """Records what ``common.until_known`` returns, with the flag it was given."""

    def __init__(self):
        self.calls = []
        self.real = common.until_known

    def __call__(self, batch, known, *args, **kwargs):
        out = self.real(batch, known, *args, **kwargs)
        self.calls.append((known.clone(), out.clone(), [it.g.clone() for it in batch.items]))
        return out


@pytest.mark.parametrize("name, backend", cases(["PSDASGD", "DAdaptSGD"]))
def test_the_statistic_is_zero_once_known(monkeypatch, name, backend):
    """Until the flag is set the launch sums the step's gradients (Σg² for D-Adapt SGD); after, every
    program writes zeros (it streams nothing), whatever the gradients."""
    require_backend(getattr(lrfree, name), backend)
    monkeypatch.setattr(common, "PERSISTENT_PROGRAMS", 3)
    spy = Spy()
    monkeypatch.setattr(common, "until_known", spy)
    from lrfree.kernels import ps_dasgd
    monkeypatch.setattr(ps_dasgd, "until_known", spy)
    params, groups = params_and_groups(False)
    opt = getattr(lrfree, name)(groups, backend=backend, skip_nonfinite=False)
    for t in range(4):
        for p, grad in zip(params, gradients(params, t, "zero")):
            p.grad = grad
        opt.step()
    assert [bool(known) for known, _, _ in spy.calls] == [False, False, False, True]
    for known, out, grads in spy.calls:
        if bool(known):
            assert torch.equal(out, torch.zeros_like(out))
        elif name == "DAdaptSGD":
            expected = sum(float((g * g).sum()) for g in grads)
            assert float(out[0]) == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert float(spy.calls[2][1].abs().sum()) > 0  # step 2's gradients are not all zero


def recorded_steps(make, sizes, steps=3):
    """The launches of ``steps`` steps on CPU tensors (nothing runs), and each dtype group's block count."""
    from lrfree.kernels import aot
    from lrfree.kernels.multi_tensor import DEFAULT_BLOCK
    with aot.recording() as rec:
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        for p in params:
            p.grad = torch.ones_like(p)
        opt = make(params)
        launches = []
        for _ in range(steps):
            first = len(rec.launches)
            opt.step()
            launches.append(rec.launches[first:])
    blocks = {n % 16 == 0: 0 for n in sizes}
    for n in sizes:
        blocks[n % 16 == 0] += -(-n // DEFAULT_BLOCK)
    return launches, set(blocks.values())


# one aligned tensor of 1025 blocks (more blocks than persistent programs) and an odd-sized one
BIG = (1025 * 2048, 4099)


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "noguard"])
@pytest.mark.parametrize("name", ["PSDASGD", "DAdaptSGD"])
def test_steady_state_launches_no_full_grid_besides_the_element_passes(name, guard):
    element_passes = {"PSDASGD": {"ps_dasgd._step_kernel"}, "DAdaptSGD": {"dadapt_sgd._dadapt_sgd_kernel"}}[name]
    if guard:
        element_passes = element_passes | {"common._sumsq_kernel"}
    steps, group_blocks = recorded_steps(lambda p: getattr(lrfree, name)(p, backend="triton", skip_nonfinite=guard),
                                         BIG)
    assert max(group_blocks) > common.PERSISTENT_PROGRAMS
    for launches in steps:
        names = [launch.name for launch in launches]
        full = {launch.name for launch in launches if launch.grid[0] > common.PERSISTENT_PROGRAMS}
        assert full == element_passes, names
        for launch in launches:
            if launch.name not in element_passes:
                assert launch.grid[0] <= common.PERSISTENT_PROGRAMS, (launch.name, launch.grid)
        # what streams every step: the element passes only (the flag-gated launches stream until known)
        assert {launch.name for launch in launches if "BLOCK" in launch.kwargs
                and not common.is_until_known(launch.kernel)} == element_passes
        # the element passes cover every block of each dtype group once
        assert {launch.grid[0] for launch in launches if launch.name in element_passes} == group_blocks
        if name == "PSDASGD":
            assert names.count("ps_dasgd._start_kernel") == 2  # one per dtype group, into one reduction
        elif guard:  # ‖g0‖ comes from the guard's Σg² pass: no second Σg² launch
            assert "common._sumsq_until_kernel" not in names
        else:  # no full-grid Σg² at all: ‖g0‖ from the small flag-gated launch
            assert "common._sumsq_kernel" not in names
            assert names.count("common._sumsq_until_kernel") == 2
