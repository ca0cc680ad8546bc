"""(3) Scalar-recursion oracles (ALGORITHMS §6.3) and Rademacher-multiplicity oracles (§6.4).

On f = ½‖x‖², every iterate of an SGD-direction method is a_t · x_0, and with x_0 = c·σ (random
signs σ) every coordinate of a per-element method follows one trajectory up to sign. So an
implementation spread over many tensors and elements must reproduce a recursion in a few scalars that
is computed here in plain Python floats, and the spread of x_t / x_0 across elements must be exactly 0.
The §6.4 table pins the official wheels' values (fp64, c = 0.3, N = 6208 in tensors 4096 and 64×33).
"""

import math

import pytest
import torch

import lrfree

RADEMACHER_SHAPES = [(4096,), (64, 33)]
MANY_SHAPES = [(3000,), (17, 31), (1,), (250, 4), (7, 7, 7), (1024,), (5,)]


def rademacher(c=0.3, shapes=RADEMACHER_SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randint(0, 2, s, generator=g) * 2 - 1).double() * c).requires_grad_() for s in shapes]


def run(make_opt, params, steps, rounding_per_step=False):
    """Run on ½‖x‖², checking after every step that all coordinates share one trajectory: exactly for
    the equal-magnitude Rademacher start, within one ulp per step taken when magnitudes differ."""
    x0 = torch.cat([p.detach().reshape(-1).clone() for p in params])
    opt = make_opt(params)
    history = []
    for t in range(steps):
        opt.zero_grad()
        loss = 0.5 * sum((p * p).sum() for p in params)
        loss.backward()
        opt.step(loss=loss)
        ratio = torch.cat([p.detach().reshape(-1) for p in params]) / x0
        spread = float(ratio.max() - ratio.min())
        ulps = (t + 1) if rounding_per_step else 0
        assert spread <= ulps * 2.3e-16 * float(ratio.abs().max()), "coordinates must share one trajectory"
        history.append((float(ratio[0]), {k: v.clone() for k, v in opt.scalars().items()}))
    return history


# -- §6.3: SGD-direction methods over many tensors --------------------------------------------------
def test_dog_matches_its_scalar_recursion():
    params = rademacher(c=1.0, shapes=MANY_SHAPES, seed=1)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # magnitudes need not be equal for an SGD-direction method
        for p in params:
            p.mul_(torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5)
    n0 = float(torch.cat([p.detach().reshape(-1) for p in params]).norm())
    history = run(lambda p: lrfree.DoG(p), params, 60, rounding_per_step=True)
    a, rbar, G = 1.0, 1e-6 * (1 + n0), None
    for t, (ratio, scalars) in enumerate(history):
        if t == 0:
            G = a * a * n0 * n0 + 1e-8
        else:
            rbar = max(rbar, abs(1 - a) * n0)
            G = G + a * a * n0 * n0
        a = a * (1 - rbar / math.sqrt(G))
        # DoG measures ‖x_t − x_0‖ on the rounded iterates; at a ≈ 1 − 1e-6 that difference loses
        # ~10 digits to cancellation (ulp / |1 − a|), and r̄ is a running max that keeps it: ~1e-10.
        assert ratio == pytest.approx(a, rel=1e-9, abs=1e-300)
        assert float(scalars["rbar"][0]) == pytest.approx(rbar, rel=1e-9)
        assert float(scalars["G"][0]) == pytest.approx(G, rel=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_dadapt_sgd_matches_its_scalar_recursion(momentum):
    params = rademacher(c=1.0, shapes=MANY_SHAPES, seed=2)
    n0 = float(torch.cat([p.detach().reshape(-1) for p in params]).norm())
    history = run(lambda p: lrfree.DAdaptSGD(p, momentum=momentum), params, 60)
    a, sigma, d, numerator = 1.0, 0.0, 1e-6, 0.0
    for ratio, scalars in history:
        dlr = d / n0  # ‖g_0‖ = n0
        numerator += dlr * a * sigma * n0 * n0
        sigma += dlr * a
        d_hat = 2 * numerator / (abs(sigma) * n0)
        d = max(d, d_hat)
        a = momentum * a + (1 - momentum) * (1 - sigma)
        assert ratio == pytest.approx(a, rel=1e-10, abs=1e-14)
        assert float(scalars["d"]) == pytest.approx(d, rel=1e-10)


# -- §6.4: per-element methods, Rademacher start --------------------------------------------------------
def test_prodigy_matches_its_scalar_recursion():
    c, N, b1, b2, eps, d0 = 0.3, 6208, 0.9, 0.999, 1e-8, 1e-6
    b3 = math.sqrt(b2)
    history = run(lambda p: lrfree.Prodigy(p), rademacher(c), 200)
    a, mu, nu, vs, R, d, d_max = 1.0, 0.0, 0.0, 0.0, 0.0, d0, d0
    for ratio, scalars in history:
        R = b3 * R + (d / d0) * d * N * a * (1 - a) * c * c
        mu = b1 * mu + d * (1 - b1) * a
        nu = b2 * nu + d * d * (1 - b2) * a * a
        vs = b3 * vs + (d / d0) * d * a
        d_hat = R / (N * abs(vs) * c)
        d_new = max(d, d_hat) if d == d0 else d
        d_max = max(d_max, d_hat)
        d_new = min(d_max, d_new * math.inf)  # growth_rate = inf
        a = a - d * mu / (math.sqrt(nu) * c + d_new * eps)
        d = d_new
        assert float(scalars["d"]) == pytest.approx(d, rel=1e-8)
        assert ratio == pytest.approx(a, rel=1e-7, abs=1e-12)


def test_dadapt_adam_matches_its_scalar_recursion():
    c, N, b1, b2, eps = 0.3, 6208, 0.9, 0.999, 1e-8
    sb2 = math.sqrt(b2)
    history = run(lambda p: lrfree.DAdaptAdam(p), rademacher(c), 200)
    a, mu, nu, vs, num, d = 1.0, 0.0, 0.0, 0.0, 0.0, 1e-6
    for ratio, scalars in history:
        A = d * N * (a * c) * (vs * c) / (math.sqrt(nu) * c + eps)
        mu = b1 * mu + d * (1 - b1) * a
        nu = b2 * nu + (1 - b2) * a * a
        vs = sb2 * vs + d * (1 - sb2) * a
        num = sb2 * num + (1 - sb2) * A
        d = max(d, num / ((1 - sb2) * N * abs(vs) * c))
        a = a - mu / (math.sqrt(nu) * c + eps)
        assert float(scalars["d"]) == pytest.approx(d, rel=1e-8)
        assert ratio == pytest.approx(a, rel=1e-7, abs=1e-12)


def test_cocob_matches_its_scalar_recursion():
    c, alpha, eps = 0.3, 100.0, 1e-8
    history = run(lambda p: lrfree.COCOB(p), rademacher(c), 200)
    a, L, theta, G, R = 1.0, eps, 0.0, 0.0, 0.0
    for ratio, _ in history:
        g = a * c
        L = max(L, abs(g))
        theta -= g
        G += abs(g)
        R = max(R - g * (a - 1) * c, 0.0)
        a = 1 + (L + R) * theta / (c * L * max(G + L, alpha * L))
        assert ratio == pytest.approx(a, rel=1e-9, abs=1e-15)


# Values of the official wheels (ALGORITHMS §6.4 table), 13 significant digits.
TABLE = {
    "DoG": (lambda p: lrfree.DoG(p), 0.9999719155922, {"rbar": 5.043508873701e-4, "G": 5587.117674622},
            1.921358239305e-7, {"rbar": 23.63725356672, "G": 39164.14326620}),
    "DAdaptSGD": (lambda p: lrfree.DAdaptSGD(p), 0.9999943358977, {"d": 9.800982220936e-5},
                  0.0, {"d": 20.50866978446}),
    "DAdaptSGD-m0.9": (lambda p: lrfree.DAdaptSGD(p, momentum=0.9), 0.9999988214952, {"d": 9.800999728263e-5},
                       3.376207496027e-5, {"d": 71.93783197597}),
    "DAdaptAdam": (lambda p: lrfree.DAdaptAdam(p), 0.2317963392196, {"d": 0.4189738051299},
                   1.800234627334e-5, {"d": 0.8740684124370}),
    "Prodigy": (lambda p: lrfree.Prodigy(p), 0.9631230510286, {"d": 3.872480162800e-3},
                -9.147207717140e-6, {"d": 0.1570818680859}),
    "COCOB": (lambda p: lrfree.COCOB(p), 0.6167650231180, {}, 1.850371707709e-16, {}),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_rademacher_reference_values(name):
    make, a10, s10, a200, s200 = TABLE[name]
    history = run(make, rademacher(0.3), 200)
    for (ratio, scalars), a, expected in ((history[9], a10, s10), (history[199], a200, s200)):
        assert ratio == pytest.approx(a, rel=1e-11, abs=1e-300)
        for key, value in expected.items():
            assert float(scalars[key].reshape(-1)[0]) == pytest.approx(value, rel=1e-11)
