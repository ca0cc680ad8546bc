"""D-Adapt Adam (Defazio & Mishchenko, ICML 2023), semantics of the official ``dadaptation`` 3.2.

One global d (domain G; ALGORITHMS §4.6). Step k, γ = max group lr, r = the group's ``layer_scale`` times
its lr ratio c = lr/γ::

    λ_k = d_k γ bc_k          (bc_k = √(1−β2^{k+1}) / (1−β1^{k+1}) with bias correction, else 1)
    g ← g + wd·x   (unless decoupled)
    A += r λ_k ⟨g, s / (√v + eps)⟩                      (old s, old v; groups with lr > 0)
    m ← β1 m + r λ_k (1−β1) g;   v ← β2 v + (1−β2) g²;   s ← √β2 s + λ_k (1−√β2) g;   S1 += r ‖s‖₁
    N ← √β2 N + (1−√β2) A;      d_{k+1} = max(d_k, min(N / ((1−√β2) S1), d_k · growth_rate))
    x ← x − c wd λ_k x (if decoupled);   x ← x − m / (√v + eps)            (groups with lr > 0)

The update never uses d_{k+1} (m already carries λ_k), so a fused backend needs one pass. Betas, bias
correction, growth rate and ``decouple`` come from param group 0; eps, weight decay and layer_scale are
per group, as in the reference. A group's lr ratio c is the reparametrization x = c·u of the group
(methods/_dadapt.py), which is exactly what the reference's ``layer_scale`` does to it, so it multiplies
layer_scale; the reference accepts only c ∈ {0, 1}. Where lrfree departs from the reference: a group
with lr = 0 does not move at all (the reference still applies its decoupled weight decay, and a stale m
if the lr was set to 0 mid-training), as the decoupled decay is scaled by c like every part of the step.
S1 = 0 leaves d and N unchanged (the reference returns early); x is
still updated, which differs from the reference only while every gradient so far was exactly zero
(then only a decoupled weight decay moves x).
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import StepBatch
from ..scalar_math import M
from ._dadapt import DAdaptBase


def dadapt_adam_rule(d, numerator, numerator_step, s_l1, sqrt_beta2, growth_rate, ADAPT):
    """N ← √β2 N + (1−√β2) A;  d̂ = N / ((1−√β2) ‖s‖₁);  d_{k+1} = max(d_k, min(d̂, d_k · growth_rate)), d frozen
    unless ``ADAPT`` (γ > 0); returns (N, d̂, d_{k+1}, whether ‖s‖₁ > 0, i.e. whether there is anything to
    estimate)."""
    numerator = sqrt_beta2 * numerator + (1 - sqrt_beta2) * numerator_step
    d_hat = M.safe_div(numerator, (1 - sqrt_beta2) * s_l1, 0.0)
    if ADAPT:
        d_next = M.maximum(d, M.minimum(d_hat, d * growth_rate))
    else:
        d_next = d
    return numerator, d_hat, d_next, s_l1 > 0


class DAdaptAdam(DAdaptBase):
    """Adam with D-Adaptation of the step size.

    Args:
        params: parameters or param groups.
        lr: multiplier γ on the adapted step (1.0). Groups may differ: γ is the largest group lr and a
            group with lr = c·γ steps as if its ``layer_scale`` were c times larger (its step, and its
            weight in the statistics of d, × c; module docstring); a group with lr = 0 never moves.
        betas: Adam's (β1, β2).
        eps: Adam's ε.
        weight_decay: L2 penalty (coupled) or decoupled weight decay (``decouple=True``).
        log_every, fsdp_in_use: accepted for compatibility with ``dadaptation``.
        decouple: AdamW-style decoupled weight decay.
        use_bias_correction: Adam's bias correction folded into the step.
        d0: initial distance estimate.
        growth_rate: cap on the per-step growth of d (inf: uncapped).
        layer_scale (per group): weight of the group in the statistics and the step.
    """

    hyperparameters = {"lr": V.NONNEG, "betas": V.betas(), "eps": V.POSITIVE, "weight_decay": V.NONNEG,
                       "log_every": V.integer(0), "decouple": V.BOOL, "use_bias_correction": V.BOOL,
                       "d0": V.POSITIVE, "growth_rate": V.GROWTH, "fsdp_in_use": V.BOOL, "layer_scale": V.NONNEG}
    kernels = "dadapt_adam"
    low_precision_state = ("s", "exp_avg", "exp_avg_sq")
    fused_rule = True

    def __init__(self, params, lr: float = 1.0, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 log_every: int = 0, decouple: bool = False, use_bias_correction: bool = False, d0: float = 1e-6,
                 growth_rate: float = math.inf, fsdp_in_use: bool = False, *, backend: str = "auto",
                 skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None,
                 per_group_d: bool = False):
        defaults = dict(lr=lr, betas=V.as_tuple(betas), eps=eps, weight_decay=weight_decay, log_every=log_every,
                        decouple=decouple, use_bias_correction=use_bias_correction, d0=d0, growth_rate=growth_rate,
                        fsdp_in_use=fsdp_in_use, layer_scale=1.0)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded,
                         per_group_d=per_group_d)

    def init_state(self, p, group):
        return {"s": self.zeros_state(p), "exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}

    def _d_scalars(self, group):
        d0 = group["d0"]
        return {"d": d0, "d_hat": d0, "numerator": 0.0, "step_size": 0.0}

    def _update_d(self, batch: StepBatch) -> None:
        lr = self._shared_lr()
        ratios = self._lr_ratios(batch)
        # r = layer_scale × lr ratio: the group's weight in the step and in both statistics of d
        scale = batch.vector(it.group["layer_scale"] * c for it, c in zip(batch.items, ratios))
        if batch.rule_kernel:  # rule kernel: accept and λ_k; the pass; rule kernel: N, d, the store
            dlr = self._pass("dadapt_adam_step_size")(batch, lr)
            stats = self._pass("dadapt_adam_step")(batch, dlr, ratios)
            self._pass("dadapt_adam_distance")(batch, lr, scale, stats, dlr)
            return
        S, ok = self.S, batch.ok
        hp = self.rule_group()
        dlr = self._adam_step_size(lr)
        # one pass: ⟨g, s/(√v+ε)⟩ and ‖s_new‖₁ per tensor; m, v, s and x updated
        stats, = batch.sync(self._pass("dadapt_adam_step")(batch, dlr, ratios))
        s_l1 = batch.reduce(scale * stats[:, 1])
        numerator, d_hat, d_next, estimable = dadapt_adam_rule(
            S["d"], S["numerator"], batch.reduce(scale * dlr * stats[:, 0]), s_l1, hp["betas"][1] ** 0.5,
            hp["growth_rate"], lr > 0)
        proceed = ok & estimable
        self._set_all(dict(numerator=numerator, d_hat=d_hat, d=d_next, step_size=dlr), proceed)
        S["steps"].add_(proceed.to(torch.float64))

    def _ref_dadapt_adam_step(self, batch: StepBatch, dlr: torch.Tensor, ratios: list[float]) -> torch.Tensor:
        """``ratios``: every tensor's lr ratio c (host floats)."""
        ok = batch.ok
        hp = self.rule_group()
        beta1, beta2 = hp["betas"]
        sqrt_beta2 = beta2 ** 0.5
        decouple = hp["decouple"]

        def step(chunk: R.Chunk) -> torch.Tensor:
            group = chunk.group
            if group["lr"] <= 0:  # lr = 0: the group's step is 0 (no decay, no stale m either)
                return torch.zeros(len(chunk), 2, dtype=torch.float64, device=batch.device)
            c = ratios[chunk.positions[0]]  # a group's lr ratio: one for the whole chunk
            decay, r, eps = group["weight_decay"], group["layer_scale"] * c, group["eps"]
            s, m, v = chunk.state("s"), chunk.state("exp_avg"), chunk.state("exp_avg_sq")
            x, g = chunk.params, chunk.grads
            if decay != 0 and not decouple:
                g = R.axpy(g, x, decay)
            dot = chunk.dot(g, s / (v.sqrt() + eps))
            chunk.commit_state("exp_avg", R.axpy(m * beta1, g, r * dlr * (1 - beta1)), ok)
            chunk.commit_state("exp_avg_sq", R.addcmul(v * beta2, g, g, 1 - beta2), ok)
            s_next = R.axpy(s * sqrt_beta2, g, dlr * (1 - sqrt_beta2))
            stats = torch.stack([dot, chunk.l1(s_next)], dim=1)
            chunk.commit_state("s", s_next, ok)
            if decay != 0 and decouple:  # the decay step is part of the group's step: × c
                x = R.axpy(x, x, -(decay * c) * dlr)
            # m and v as committed: a commit writes into the chunk's matrices, as commit_ into the state
            chunk.commit_params(x - m / (v.sqrt() + eps), ok)
            return stats
        return R.per_item(batch, step)
