"""Prodigy (Mishchenko & Defazio, ICML 2024), semantics of the official ``prodigyopt`` 1.1.2.

One global d (domain G; ALGORITHMS §4.7). Step k, γ = max group lr, c = the group's lr ratio lr/γ,
J = every ``slice_p``-th element::

    λ_k = d_k γ bc_k;     R ← β3 R
    g ← g + wd·x   (unless decoupled)
    ΔR += (d_k/d0) λ_k ⟨g_J, p0 − x_J⟩                                   (groups with lr > 0)
    m ← β1 m + d_k (1−β1) g;   v ← β2 v + d_k² (1−β2) g²;   s ← β3 s + c (d_k/d0) λ_k g_J;   S1 += ‖s‖₁
    R ← R + ΔR;   d̂ = d_coef R / S1;   d ← max(d, d̂) only while d = d0;   d_max ← max(d_max, d̂)
    d_{k+1} = min(d_max, d · growth_rate)
    x ← x − c wd λ_k x (if decoupled);   x ← x − c λ_k m / (√v + d_{k+1} eps)   (β1 = 0: c λ_k d_{k+1} g / (...))

A group's lr ratio c is Prodigy run on the reparametrized network x = c·u (methods/_dadapt.py): the
group's step is c times the shared one, s (the denominator's statistic) sees the gradient c·g of the u
coordinates, and the numerator ⟨g, p0 − x⟩ = ⟨c g, (p0 − x)/c⟩ does not change. The reference accepts only
c ∈ {0, 1}, where this is its arithmetic; lrfree departs from it for a group with lr = 0 and decoupled
weight decay, which the reference still decays and lrfree leaves in place (the decay is part of the step).

The update uses d_{k+1} (inside ε, and fully when β1 = 0), so an exact fused backend needs two passes.
``safeguard_warmup`` replaces λ_k by d_k in the s update. Betas, β3, d_coef, growth rate, decouple and
bias correction come from param group 0; eps, weight decay, d0, safeguard and slice_p are per group, and
the "d is still d0" test uses the last group's d0, all as in the reference. S1 = 0 leaves x and the
scalars unchanged (the reference returns early).
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import StepBatch
from ..scalar_math import M
from ._dadapt import DAdaptBase


def prodigy_rule(d, d_max, d_hat, numerator, delta, denominator, first_d0, beta3, d_coef, growth_rate, ADAPT):
    """R ← β3 R + ΔR;  d̂ = d_coef R/‖s‖₁;  d jumps to d̂ only while d = ``first_d0``;  d_max ← max(d_max, d̂);
    d_{k+1} = min(d_max, d·growth_rate). d, d̂ and d_max are frozen unless ``ADAPT`` (γ > 0). Returns
    (R, d̂, d_max, d_{k+1}, whether ‖s‖₁ > 0, i.e. whether there is anything to estimate)."""
    numerator = beta3 * numerator + delta
    if ADAPT:
        d_hat = M.safe_div(d_coef * numerator, denominator, 0.0)
        d_new = M.where(d == first_d0, M.maximum(d, d_hat), d)
        d_max = M.maximum(d_max, d_hat)
        d_next = M.minimum(d_max, d_new * growth_rate)
    else:
        d_next = d
    return numerator, d_hat, d_max, d_next, denominator > 0


class Prodigy(DAdaptBase):
    """Prodigy: an expeditiously adaptive parameter-free learner (Adam direction).

    Args:
        params: parameters or param groups.
        lr: multiplier γ on the adapted step (1.0). Groups may differ: γ is the largest group lr and a
            group with lr = c·γ takes c times the shared step, with d estimated as Prodigy on the network
            reparametrized by x = c·u (module docstring); a group with lr = 0 never moves.
        betas: Adam's (β1, β2); β1 = 0 drops the first moment.
        beta3: decay of the D-estimate EMAs (None: √β2).
        eps: Adam's ε (scaled by d).
        weight_decay: decoupled (default) or coupled weight decay.
        decouple: AdamW-style decoupled weight decay.
        use_bias_correction: Adam's bias correction folded into the step.
        safeguard_warmup: use d instead of d·γ in the denominator statistic (for warm-up schedules).
        d0: initial distance estimate.
        d_coef: multiplier on the estimate d̂.
        growth_rate: cap on the per-step growth of d (inf: uncapped).
        fsdp_in_use: accepted for compatibility with ``prodigyopt``.
        slice_p: compute the D-estimate on every slice_p-th element only (saves memory).
    """

    hyperparameters = {"lr": V.NONNEG, "betas": V.betas(), "beta3": V.optional(V.UNIT_INTERVAL), "eps": V.POSITIVE,
                       "weight_decay": V.NONNEG, "decouple": V.BOOL, "use_bias_correction": V.BOOL,
                       "safeguard_warmup": V.BOOL, "d0": V.POSITIVE, "d_coef": V.POSITIVE, "growth_rate": V.GROWTH,
                       "fsdp_in_use": V.BOOL, "slice_p": V.integer(1)}
    kernels = "prodigy"
    low_precision_state = ("s", "exp_avg", "exp_avg_sq")
    fused_rule = True

    def __init__(self, params, lr: float = 1.0, betas=(0.9, 0.999), beta3: float | None = None, eps: float = 1e-8,
                 weight_decay: float = 0, decouple: bool = True, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = math.inf, fsdp_in_use: bool = False, slice_p: int = 1, *,
                 backend: str = "auto", skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None,
                 per_group_d: bool = False):
        defaults = dict(lr=lr, betas=V.as_tuple(betas), beta3=beta3, eps=eps, weight_decay=weight_decay,
                        decouple=decouple, use_bias_correction=use_bias_correction, safeguard_warmup=safeguard_warmup,
                        d0=d0, d_coef=d_coef, growth_rate=growth_rate, fsdp_in_use=fsdp_in_use, slice_p=slice_p)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded,
                         per_group_d=per_group_d)

    @staticmethod
    def _sliced(t: torch.Tensor, group: dict) -> torch.Tensor:
        return t.reshape(-1)[:: group["slice_p"]]

    def init_state(self, p, group):
        state = {"s": self.zeros_state(self._sliced(p, group)),
                 "p0": self._sliced(p, group).detach().clone(),
                 "exp_avg_sq": self.zeros_state(p)}
        if self.rule_group(group)["betas"][0] > 0:
            state["exp_avg"] = self.zeros_state(p)
        return state

    def _d_scalars(self, group):
        d0 = group["d0"]
        return {"d": d0, "d_max": d0, "d_hat": d0, "numerator": 0.0, "denominator": 0.0, "step_size": 0.0}

    def _beta3(self) -> float:
        """β3, the decay of the D-estimate's EMAs: the rule group's, or √β2 (as prodigyopt takes it)."""
        hp = self.rule_group()
        return math.sqrt(hp["betas"][1]) if hp["beta3"] is None else hp["beta3"]

    def _update_d(self, batch: StepBatch) -> None:
        lr = self._shared_lr()
        ratios = self._lr_ratios(batch)
        if batch.rule_kernel:
            # rule kernel: accept, λ_k and the passes' coefficients; pass A; rule kernel: d and the store; pass B
            coefficients = self._pass("prodigy_step_size")(batch, lr, ratios)
            stats = self._pass("prodigy_rule_stats")(batch, coefficients)
            proceed = self._pass("prodigy_distance")(batch, lr, stats, coefficients)
            self._pass("prodigy_apply")(batch, coefficients.steps, self.S["d"], proceed)  # d committed: d_{k+1}
            return
        S, ok = self.S, batch.ok
        hp = self.rule_group()
        d = S["d"]
        dlr = self._adam_step_size(lr)
        ratios = batch.vector(ratios)
        # pass A: ⟨g_J, p0 − x_J⟩ and ‖s_new‖₁ per tensor; m, v and s updated
        stats, = batch.sync(self._pass("prodigy_stats")(batch, d, dlr, ratios))
        denominator = batch.reduce(stats[:, 1])
        numerator, d_hat, d_max, d_next, estimable = prodigy_rule(
            d, S["d_max"], S["d_hat"], S["numerator"], batch.reduce((d / batch.per_item("d0")) * dlr * stats[:, 0]),
            denominator, self._first_rise_d0(), self._beta3(), hp["d_coef"], hp["growth_rate"], lr > 0)
        proceed = ok & estimable
        # pass B: the update (each tensor's step c λ), with the new d inside ε
        self._pass("prodigy_apply")(batch, dlr * ratios, d_next, proceed)
        new = dict(numerator=numerator, denominator=denominator, d_hat=d_hat, d_max=d_max, d=d_next, step_size=dlr)
        self._set_all(new, proceed)
        S["steps"].add_(proceed.to(torch.float64))

    def _ref_prodigy_stats(self, batch: StepBatch, d: torch.Tensor, dlr: torch.Tensor,
                           ratios: torch.Tensor) -> torch.Tensor:
        """``ratios``: every tensor's lr ratio c (fp64, one per item)."""
        ok = batch.ok
        hp = self.rule_group()
        beta1, beta2 = hp["betas"]
        beta3 = math.sqrt(beta2) if hp["beta3"] is None else hp["beta3"]

        def stats(c: R.Chunk) -> torch.Tensor:
            group = c.group
            if group["lr"] <= 0:
                return torch.zeros(len(c), 2, dtype=torch.float64, device=batch.device)
            x = c.params
            g = self._coupled_gradient(c, x)
            sliced = c.every(group["slice_p"])  # the elements J, where p0 and s live (flattened)
            g_j = sliced.take(g)
            dot = sliced.dot(g_j, sliced.state("p0", flat=True) - sliced.take(x))
            if beta1 > 0:
                m = c.state("exp_avg")
                c.commit_state("exp_avg", R.axpy(m * beta1, g, d * (1 - beta1)), ok)
            v = c.state("exp_avg_sq")
            c.commit_state("exp_avg_sq", R.addcmul(v * beta2, g, g, d * d * (1 - beta2)), ok)
            weight = d if group["safeguard_warmup"] else dlr
            s_next = R.axpy(sliced.state("s", flat=True) * beta3, g_j,
                            sliced.per_tensor((d / group["d0"]) * weight * ratios))
            out = torch.stack([dot, sliced.l1(s_next)], dim=1)
            sliced.commit_state("s", s_next, ok, flat=True)
            return out
        return R.per_item(batch, stats)

    def _ref_prodigy_apply(self, batch: StepBatch, steps: torch.Tensor, d_new: torch.Tensor,
                           proceed: torch.Tensor) -> None:
        """``steps``: every tensor's c λ (fp64, one per item)."""
        hp = self.rule_group()
        for c in R.chunks(batch):
            group = c.group
            x = c.params
            denom = c.state("exp_avg_sq").sqrt() + d_new * group["eps"]
            if group["weight_decay"] != 0 and hp["decouple"]:
                x = R.axpy(x, x, c.per_tensor(-group["weight_decay"] * steps))
            if hp["betas"][0] > 0:
                x_new = R.addcdiv(x, c.state("exp_avg"), denom, -c.per_tensor(steps))
            else:
                x_new = R.addcdiv(x, self._coupled_gradient(c, c.params), denom, c.per_tensor(-steps * d_new))
            c.commit_params(x_new, proceed)

    def _coupled_gradient(self, c: R.Chunk, x: torch.Tensor) -> torch.Tensor:
        decay = c.group["weight_decay"]
        return R.axpy(c.grads, x, decay) if decay != 0 and not self.rule_group()["decouple"] else c.grads
