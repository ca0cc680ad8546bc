"""Independent test oracles for the methods that have no installable official package.

* ``ReferenceSps`` / ``ReferenceDecSps``: transcriptions of the authors' code (IssamLaradji/sps
  ``Sps.step`` at 6d112a1; aorvieto/DecSPS ``SPS_decr``), host-side Python floats and all.
* ``Flat*``: plain fp64 transcriptions of the library's documented rules (ALGORITHMS §1.3, §2, §4).
  They work on one flat vector holding every parameter that has a gradient, so they share no code and
  no reduction structure with the per-tensor library implementation.

All of them are ``torch.optim.Optimizer``s driven by ``step(loss)``.
"""

from __future__ import annotations

import math

import torch


class FlatOptimizer(torch.optim.Optimizer):
    """Gathers the parameters that have gradients into one flat fp64 vector and scatters back."""

    def __init__(self, params):
        super().__init__(params, {})
        self.k = 0

    def _active(self):
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def flat(self):
        ps = self._active()
        x = torch.cat([p.detach().reshape(-1).double() for p in ps])
        g = torch.cat([p.grad.reshape(-1).double() for p in ps])
        return ps, x, g

    @staticmethod
    def scatter(ps, x):
        offset = 0
        for p in ps:
            n = p.numel()
            p.data.copy_(x[offset:offset + n].view_as(p))
            offset += n


class ReferenceSps(torch.optim.Optimizer):
    """The authors' ``Sps`` (step sizes as Python floats, ``.item()`` syncs and all)."""

    def __init__(self, params, n_batches_per_epoch=500, init_step_size=1.0, c=0.5, gamma=2.0, eta_max=None,
                 adapt_flag="smooth_iter", fstar=0.0, eps=1e-8):
        super().__init__(params, {})
        self.cfg = dict(n=n_batches_per_epoch, c=c, gamma=gamma, eta_max=eta_max, flag=adapt_flag, fstar=fstar, eps=eps)
        self.step_size = init_step_size

    @torch.no_grad()
    def step(self, loss):
        cfg = self.cfg
        params = [p for g in self.param_groups for p in g["params"]]
        norm = torch.sqrt(sum(torch.sum(p.grad * p.grad) for p in params if p.grad is not None))
        if norm < 1e-8:
            step_size = 0.0
        else:
            if cfg["flag"] == "constant":
                step_size = (loss - cfg["fstar"]) / (cfg["c"] * norm ** 2 + cfg["eps"])
                if loss < cfg["fstar"]:
                    step_size = 0.0
                else:
                    step_size = step_size.item() if cfg["eta_max"] is None else min(cfg["eta_max"], step_size.item())
            else:
                step_size = loss / (cfg["c"] * norm ** 2 + cfg["eps"])
                step_size = min(cfg["gamma"] ** (1.0 / cfg["n"]) * self.step_size, step_size.item())
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-step_size)
        self.step_size = step_size


class ReferenceDecSps(FlatOptimizer):
    """The authors' ``SPS_decr``: the Polyak ratio is f / ‖g + 1e-4‖² and c_k = c0 √(k+1)."""

    def __init__(self, params, c_init=1.0, gamma_max=10.0, decr="sqrt"):
        super().__init__(params)
        self.c_init, self.gamma_max, self.decr = c_init, gamma_max, decr
        self.c_prev = self.gamma_prev = None

    @torch.no_grad()
    def step(self, loss):
        ps, x, g = self.flat()
        sps = float(loss) / torch.linalg.norm(g + 1e-4).item() ** 2
        if self.k == 0:
            c = self.c_init
            gamma = min(sps, c * self.gamma_max) / c
        else:
            c = self.c_init * (math.sqrt(self.k + 1) if self.decr == "sqrt" else self.k + 1)
            gamma = min(sps, self.c_prev * self.gamma_prev) / c
        self.c_prev, self.gamma_prev = c, gamma
        self.scatter(ps, x - gamma * g)
        self.k += 1


class FlatInexactPolyak(FlatOptimizer):
    """η = max(f − l*, 0) / (√T ‖g‖²), 0 when g = 0."""

    def __init__(self, params, T, lower_bound=0.0):
        super().__init__(params)
        self.T, self.lower = T, lower_bound

    @torch.no_grad()
    def step(self, loss):
        ps, x, g = self.flat()
        gsq = float(g @ g)
        eta = max(float(loss) - self.lower, 0.0) / (math.sqrt(self.T) * gsq) if gsq > 0 else 0.0
        self.step_size = eta
        self.scatter(ps, x - eta * g)


class FlatSps(FlatOptimizer):
    """SPS without the reference's quirks: f* and eta_max in both modes, the gap clamped at 0, and a
    tiny gradient (‖g‖ < 1e-8) neither stepping nor resetting the smooth reference."""

    def __init__(self, params, c=0.5, f_star=0.0, eta_max=None, adapt_flag="smooth_iter", n=500, init=1.0,
                 gamma=2.0, eps=1e-8):
        super().__init__(params)
        self.c, self.f_star, self.eta_max, self.flag = c, f_star, eta_max, adapt_flag
        self.growth, self.ref, self.eps = gamma ** (1.0 / n), init, eps

    @torch.no_grad()
    def step(self, loss):
        ps, x, g = self.flat()
        gsq = float(g @ g)
        if math.sqrt(gsq) < 1e-8:
            return
        gap = float(loss) - self.f_star
        polyak = gap / (self.c * gsq + self.eps)
        cap = math.inf if self.eta_max is None else self.eta_max
        if self.flag == "constant":
            step = 0.0 if gap < 0 else min(polyak, cap)
        else:
            step = min(self.growth * self.ref, max(polyak, 0.0), cap)
            self.ref = step
        self.scatter(ps, x - step * g)


class FlatDecSps(FlatOptimizer):
    """γ_t = min((f − l*)₊/‖g‖², c_{t−1}γ_{t−1}) / c_t, c_t = c0 √(t+1), c_{−1}γ_{−1} = c0 γ_b."""

    def __init__(self, params, c0=1.0, gamma_b=10.0, lower_bound=0.0):
        super().__init__(params)
        self.c0, self.lower = c0, lower_bound
        self.c_gamma = c0 * gamma_b

    @torch.no_grad()
    def step(self, loss):
        ps, x, g = self.flat()
        gsq = float(g @ g)
        ratio = max(float(loss) - self.lower, 0.0) / gsq if gsq > 0 else math.inf
        self.c_gamma = min(ratio, self.c_gamma)
        gamma = self.c_gamma / (self.c0 * math.sqrt(self.k + 1))
        self.scatter(ps, x - gamma * g)
        self.k += 1


class FlatAdaSps(FlatOptimizer):
    """η_t = min((f−l*) / (c_p ‖g‖² √Σ(f_s−l*)), η_{t−1}),  η_{−1} = ∞."""

    def __init__(self, params, c_p=1.0, lower_bound=0.0):
        super().__init__(params)
        self.c_p, self.lower = c_p, lower_bound
        self.gap_sum, self.eta = 0.0, math.inf

    @torch.no_grad()
    def step(self, loss):
        ps, x, g = self.flat()
        gap = max(float(loss) - self.lower, 0.0)
        self.gap_sum += gap
        gsq = float(g @ g)
        if gsq > 0:
            ratio = gap / (self.c_p * gsq * math.sqrt(self.gap_sum)) if gap > 0 else 0.0
            self.eta = min(ratio, self.eta)
            self.scatter(ps, x - self.eta * g)


class _FlatAdamScale(FlatOptimizer):
    """Adam scaling α² = √v̂ + ε on the flat vector (AMSGrad: running max of v̂), and the direction."""

    def __init__(self, params, betas, eps, amsgrad):
        super().__init__(params)
        self.b1, self.b2 = betas
        self.eps, self.amsgrad = eps, amsgrad
        self.v = self.m = self.vmax = None

    def scale(self, g):
        t = self.k + 1
        if self.v is None:
            self.v, self.m, self.vmax = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
        v_prev_hat = self.vmax.clone() if self.amsgrad else (self.v / (1 - self.b2 ** (t - 1)) if t > 1 else None)
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        v_hat = self.v / (1 - self.b2 ** t)
        if self.amsgrad:
            self.vmax = torch.maximum(self.vmax, v_hat)
            v_hat = self.vmax
        alpha_sq = v_hat.sqrt() + self.eps
        alpha_sq_prev = None if v_prev_hat is None else v_prev_hat.sqrt() + self.eps
        self.m = self.b1 * self.m + (1 - self.b1) * g
        direction = (self.m / (1 - self.b1 ** t) if self.b1 > 0 else g) / alpha_sq
        return alpha_sq, alpha_sq_prev, direction


class FlatPSSps(_FlatAdamScale):
    """η = (f − f*)₊ / (c Σ g²/α²), growth-capped by gamma^(1/n) relative to the previous η."""

    def __init__(self, params, c=0.5, f_star=0.0, betas=(0.0, 0.999), eps=1e-8, amsgrad=False, smooth=True,
                 gamma=2.0, n=500):
        super().__init__(params, betas, eps, amsgrad)
        self.c, self.f_star, self.smooth, self.growth = c, f_star, smooth, gamma ** (1.0 / n)
        self.ref = math.inf

    @torch.no_grad()
    def step(self, loss):
        ps, x, g = self.flat()
        alpha_sq, _, u = self.scale(g)
        scaled = float((g * g / alpha_sq).sum())
        eta = max(float(loss) - self.f_star, 0.0) / (self.c * scaled) if scaled > 0 else 0.0
        if self.smooth:
            eta = min(eta, self.growth * self.ref)
            if scaled > 0:
                self.ref = eta
        self.step_size = eta
        self.scatter(ps, x - eta * u)
        self.k += 1


class FlatPSDASgd(_FlatAdamScale):
    """The PS-DA-SGD reconstruction of the library, written out on one vector."""

    def __init__(self, params, momentum=0.0, betas=(0.9, 0.999), eps=1e-8, d0=1e-6, growth_rate=math.inf,
                 amsgrad=False):
        super().__init__(params, betas, eps, amsgrad)
        self.mu, self.d0, self.growth = momentum, d0, growth_rate
        self.d = self.n0 = None
        self.numerator, self.s, self.x0 = 0.0, None, None

    @torch.no_grad()
    def step(self, loss=None):
        ps, x, g = self.flat()
        t = self.k + 1
        alpha_sq, alpha_sq_prev, u = self.scale(g)
        if self.n0 is None:
            self.n0 = math.sqrt(float((g * g / alpha_sq).sum()))
            self.d = self.d0 * math.sqrt(float(alpha_sq.mean()))
            self.s, self.x0 = torch.zeros_like(x), x.clone()
        lam = self.d / self.n0
        rho = 1.0 if t == 1 else max(1.0, math.sqrt(float((alpha_sq_prev / alpha_sq).max())))
        self.numerator = self.numerator / rho + lam * float(g @ self.s)
        self.s = self.s + lam * u
        d_hat = 2 * self.numerator / math.sqrt(float((alpha_sq * self.s * self.s).sum()))
        self.d = max(self.d, min(d_hat, self.d * self.growth))
        x = self.mu * x + (1 - self.mu) * (self.x0 - self.s) if self.mu > 0 else x - lam * u
        self.scatter(ps, x)
        self.k += 1


class FlatPSDASgdGroups(FlatOptimizer):
    """PS-DA-SGD with per-group lr, primal averaging μ and AMSGrad, written out on one vector in the
    original coordinates, from the rule of ``lrfree.methods._dadapt`` (group g: lr = c_g γ):

        n0² = Σ c g²/α²,  d = d0·√(Σ c α² / n),  λ = d γ / n0,  ρ = max(1, √max α²_prev/α²)
        N ← N/ρ + λ⟨g, s⟩,  s ← s + λ c u,  d̂ = 2N/√(Σ α² s²/c),  x ← μ x + (1−μ)(x0 − s)  or  x − λ c u
    """

    def __init__(self, param_groups, betas=(0.9, 0.999), eps=1e-8, d0=1e-6):
        super().__init__(param_groups)
        self.b1, self.b2 = betas
        self.eps, self.d0 = eps, d0
        self.d = self.n0 = None
        self.numerator = 0.0

    def _per_element(self, key, ps):
        active = {id(p) for p in ps}
        return torch.cat([torch.full((p.numel(),), float(g[key]), dtype=torch.float64)
                          for g in self.param_groups for p in g["params"] if id(p) in active])

    @torch.no_grad()
    def step(self, loss=None):
        ps, x, g = self.flat()
        gamma = max(gr["lr"] for gr in self.param_groups)
        c = self._per_element("lr", ps) / gamma
        mu = self._per_element("momentum", ps)
        ams = self._per_element("amsgrad", ps) != 0
        t = self.k + 1
        if self.n0 is None:
            self.v, self.m, self.vmax = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g)
            self.s, self.x0 = torch.zeros_like(x), x.clone()
        v_prev_hat = torch.where(ams, self.vmax, self.v / (1 - self.b2 ** (t - 1)) if t > 1 else self.v)
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        v_hat = self.v / (1 - self.b2 ** t)
        self.vmax = torch.where(ams, torch.maximum(self.vmax, v_hat), self.vmax)
        v_hat = torch.where(ams, self.vmax, v_hat)
        alpha_sq, alpha_sq_prev = v_hat.sqrt() + self.eps, v_prev_hat.sqrt() + self.eps
        self.m = self.b1 * self.m + (1 - self.b1) * g
        u = (self.m / (1 - self.b1 ** t) if self.b1 > 0 else g) / alpha_sq
        if self.n0 is None:
            self.n0 = math.sqrt(float((c * g * g / alpha_sq).sum()))
            self.d = self.d0 * math.sqrt(float((c * alpha_sq).sum()) / x.numel())
        lam = self.d * gamma / self.n0
        rho = 1.0 if t == 1 else max(1.0, math.sqrt(float((alpha_sq_prev / alpha_sq).max())))
        self.numerator = self.numerator / rho + lam * float(g @ self.s)
        self.s = self.s + lam * c * u
        d_hat = 2 * self.numerator / math.sqrt(float((alpha_sq * self.s * self.s / c).sum()))
        self.d = max(self.d, d_hat)
        x = torch.where(mu > 0, mu * x + (1 - mu) * (self.x0 - self.s), x - lam * c * u)
        self.scatter(ps, x)
        self.k += 1
