"""(2) Closed forms of the Polyak family (ALGORITHMS §6.2), on f(x) = ½‖x‖² spread over several tensors.

On ½‖x‖² every iterate of these methods is a multiple of x_0, so the expected trajectory is a scalar
recursion that any per-tensor or blocked reduction must reproduce exactly.
"""

import math

import pytest
import torch

import lrfree
from conftest import rel_err

SHAPES = [(37,), (5, 9), (1,), (3, 4, 5)]


def quadratic_tensors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]


def half_sq_norm(params):
    return 0.5 * sum((p * p).sum() for p in params)


def run_quadratic(make_opt, steps, loss_scale=1.0, seed=0):
    params = quadratic_tensors(seed)
    x0 = torch.cat([p.detach().reshape(-1).clone() for p in params])
    opt = make_opt(params)
    ratios = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_scale * half_sq_norm(params)
        loss.backward()
        opt.step(loss=loss)
        x = torch.cat([p.detach().reshape(-1) for p in params])
        ratio = x / x0
        assert float(ratio.max() - ratio.min()) <= 1e-15 * max(1.0, float(ratio.abs().max())), \
            "iterates must stay a multiple of x0"
        ratios.append(float(ratio.mean()))
    return ratios, opt


def test_polyak_with_exact_optimum_halves_the_iterate():
    # Inexact Polyak with T = 1 and l* = f* is the Polyak step: η = f/‖g‖² = ½ on ½‖x‖².
    ratios, opt = run_quadratic(lambda p: lrfree.InexactPolyak(p, T=1, lower_bound=0.0), 20)
    assert ratios == [0.5 ** (t + 1) for t in range(20)]
    assert float(opt.scalars()["step_size"]) == 0.5


def test_polyak_on_an_anisotropic_quadratic():
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    opt = lrfree.InexactPolyak([x], T=1)
    for _ in range(5):
        xv = x.detach().clone()
        expected_eta = float(xv @ A @ xv / (2 * (A @ xv) @ (A @ xv)))
        opt.zero_grad()
        loss = 0.5 * x @ A @ x
        loss.backward()
        opt.step(loss=loss)
        assert float(opt.scalars()["step_size"]) == pytest.approx(expected_eta, rel=1e-14)
        assert rel_err(x.detach(), xv - expected_eta * (A @ xv)) < 1e-14


@pytest.mark.parametrize("T", [1, 16, 1000])
def test_inexact_polyak_closed_form(T):
    ratios, _ = run_quadratic(lambda p: lrfree.InexactPolyak(p, T=T), 30)
    factor = 1 - 1 / (2 * math.sqrt(T))
    for t, r in enumerate(ratios):
        assert r == pytest.approx(factor ** (t + 1), rel=1e-13)


def test_sps_one_step_to_the_optimum_with_c_half():
    ratios, _ = run_quadratic(lambda p: lrfree.SPS(p, c=0.5, adapt_flag="constant"), 1)
    assert abs(ratios[0]) < 1e-9  # exactly 0 up to the eps = 1e-8 in the denominator
    ratios, _ = run_quadratic(lambda p: lrfree.SPS(p, c=0.5, adapt_flag="smooth_iter", init_step_size=1.0), 1)
    assert abs(ratios[0]) < 1e-9


def test_sps_halves_with_c_one():
    ratios, _ = run_quadratic(lambda p: lrfree.SPS(p, c=1.0, adapt_flag="constant", eps=0.0), 10)
    assert ratios == pytest.approx([0.5 ** (t + 1) for t in range(10)], rel=1e-13)


def test_decsps_closed_form():
    ratios, opt = run_quadratic(lambda p: lrfree.DecSPS(p, c0=1.0, gamma_b=0.5), 40)
    expected = 1.0
    for t, r in enumerate(ratios):
        expected *= 1 - 1 / (2 * math.sqrt(t + 1))
        assert r == pytest.approx(expected, rel=1e-12)


def test_adasps_closed_form():
    c_p = 0.7
    ratios, _ = run_quadratic(lambda p: lrfree.AdaSPS(p, c_p=c_p), 30)
    x0 = quadratic_tensors()
    f = float(half_sq_norm(x0).detach())
    a, gap_sum = 1.0, 0.0
    for r in ratios:
        gap_sum += f
        eta = 1 / (2 * c_p * math.sqrt(gap_sum))
        a *= 1 - eta
        f *= (1 - eta) ** 2
        assert r == pytest.approx(a, rel=1e-12)


def test_clipped_sgd_closed_form():
    lr, max_norm = 0.1, 0.5
    params = quadratic_tensors()
    opt = lrfree.ClippedSGD(params, lr=lr, max_norm=max_norm, eps=0.0)
    x = torch.cat([p.detach().reshape(-1).clone() for p in params])
    for _ in range(40):
        opt.zero_grad()
        half_sq_norm(params).backward()
        opt.step()
        norm = float(x.norm())
        x = x - lr * min(1.0, max_norm / norm) * x
        assert rel_err(torch.cat([p.detach().reshape(-1) for p in params]), x) < 1e-13


# -- loss-scale invariance ---------------------------------------------------------------------------
INVARIANT = {
    "InexactPolyak": lambda p, c: lrfree.InexactPolyak(p, T=10),
    # c = 2 keeps ‖g‖ above SPS's absolute 1e-8 "no step" threshold (not scale-invariant) for 25 steps
    "SPS-constant": lambda p, c: lrfree.SPS(p, c=2.0, adapt_flag="constant", eps=0.0),
    "SPS-smooth": lambda p, c: lrfree.SPS(p, c=2.0, eps=0.0, init_step_size=0.3 / c),
    "DecSPS": lambda p, c: lrfree.DecSPS(p, c0=1.5, gamma_b=0.4 / c),
    "AdaSPS-rescaled-cp": lambda p, c: lrfree.AdaSPS(p, c_p=0.7 / math.sqrt(c)),
}


@pytest.mark.parametrize("name", sorted(INVARIANT))
def test_loss_scale_invariance(name):
    base, _ = run_quadratic(lambda p: INVARIANT[name](p, 1.0), 25)
    scaled, _ = run_quadratic(lambda p: INVARIANT[name](p, 1000.0), 25, loss_scale=1000.0)
    assert scaled == pytest.approx(base, rel=1e-12)


def test_adasps_is_not_scale_invariant_with_a_fixed_cp():
    base, _ = run_quadratic(lambda p: lrfree.AdaSPS(p, c_p=2.0), 1)
    scaled, _ = run_quadratic(lambda p: lrfree.AdaSPS(p, c_p=2.0), 1, loss_scale=100.0)
    # the first step is η = 1/(2 c_p √f_0); ×100 on the loss divides it by 10
    eta_base, eta_scaled = 1 - base[0], 1 - scaled[0]
    assert eta_scaled == pytest.approx(eta_base / 10, rel=1e-12)


# -- the (L0, L1)-smooth quartic of Takezawa et al. §6.1 -------------------------------------------------
L0, X0, F_STAR = 1.0, 5.0, 1.0


def quartic(x, L1):
    return L0 * L1 ** 2 / 72 * x ** 4 + L0 / 4 * x ** 2 + F_STAR


def best_gap(make_opt, L1, steps):
    x = torch.tensor([X0], dtype=torch.float64, requires_grad=True)
    opt = make_opt([x])
    best = float(quartic(x.detach(), L1))
    for _ in range(steps):
        opt.zero_grad()
        loss = quartic(x, L1).sum()
        loss.backward()
        best = min(best, float(loss.detach()))
        opt.step(loss=loss)
        if not math.isfinite(float(x.detach())):
            return math.inf
    return min(best, float(quartic(x.detach(), L1))) - F_STAR


@pytest.mark.parametrize("L1", [1.0, 10.0, 100.0, 1000.0])
def test_inexact_polyak_converges_whatever_L1(L1):
    gap = best_gap(lambda p: lrfree.InexactPolyak(p, T=1000, lower_bound=0.0), L1, 1000)
    assert gap < 2e-4


@pytest.mark.parametrize("L1", [1.0, 10.0, 100.0, 1000.0])
def test_polyak_with_known_optimum_reaches_it(L1):
    assert best_gap(lambda p: lrfree.InexactPolyak(p, T=1, lower_bound=F_STAR), L1, 500) < 1e-12


@pytest.mark.parametrize("lr", [1e-1, 1e-3, 1e-5, 1e-7])
def test_gd_with_one_fixed_lr_fails_for_some_L1(lr):
    # The paper's tuned GD learning rates, one per L1: none of them works for all four L1.
    def gd(p):
        return lrfree.ClippedSGD(p, lr=lr, max_norm=math.inf)
    gaps = [best_gap(gd, L1, 1000) for L1 in (1.0, 10.0, 100.0, 1000.0)]
    assert max(gaps) > 1e-1, gaps


def test_inexact_polyak_best_iterate_keeps_the_best_parameters():
    x = torch.tensor([X0], dtype=torch.float64, requires_grad=True)
    opt = lrfree.InexactPolyak([x], T=100, best_iterate=True)
    seen = []
    for _ in range(100):
        opt.zero_grad()
        loss = quartic(x, 100.0).sum()
        loss.backward()
        seen.append((float(loss.detach()), float(x.detach())))
        opt.step(loss=loss)
    final_loss = float(quartic(x.detach(), 100.0))
    opt.update_best(quartic(x.detach(), 100.0).sum())
    seen.append((final_loss, float(x.detach())))
    best_loss, best_x = min(seen)
    assert float(opt.scalars()["best_loss"]) == best_loss
    opt.load_best()
    assert float(x.detach()) == best_x
