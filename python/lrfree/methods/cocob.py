"""COCOB-Backprop (Orabona & Tommasi, NeurIPS 2017), semantics of ``parameterfree`` (bremen79).

Coin betting, purely per element (no reductions; ALGORITHMS §4.8)::

    g̃ = (g + wd·x) · γ                       γ = the element's group lr (1 by default)
    L ← max(L, |g̃|);   θ ← θ − g̃;   G ← G + |g̃|;   R ← max(R − g̃ (x − x_0), 0)
    x ← x_0 + (L + R) θ / (L · max(G + L, α L))

with L initialised to eps. At γ = 1 this is exactly PyPI ``parameterfree`` 0.0.1. One pass, no syncs;
state 20 B/param (θ, G, L, R, x_0).

Every quantity is per element, so every hyperparameter is per group: a group's lr scales the gradients
its own bettors see (the reference's repo HEAD scales every group by the largest group lr instead, so a
group with lr = 0 still moved). With γ = 0 the bettors see g̃ = 0: L, θ, G and R keep their values and x
is recomputed from them unchanged, so the group never moves and its state stays consistent — it resumes
where it stopped when its lr is raised again. α (the cap on the early betting fraction) and eps (L's
initial value) are per group too.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch


class COCOB(FusedOptimizer):
    """COCOB-Backprop.

    Args:
        params: parameters or param groups.
        alpha: the cap α on the betting fraction early in training (100; per group).
        eps: initial value of the per-element gradient bound L (per group).
        weight_decay: coupled L2 penalty.
        lr: multiplier on the gradients fed to the group's bettors (1 is the paper's method; 0 freezes the
            group).
    """

    hyperparameters = {"alpha": V.NONNEG, "eps": V.POSITIVE, "weight_decay": V.NONNEG, "lr": V.NONNEG}
    kernels = "cocob"
    low_precision_state = ("sum_negative_gradients", "grad_norm_sum", "L", "reward")
    fused_rule = True  # no scalar rule: the rule kernel is the accept decision and the counters

    def __init__(self, params, alpha: float = 100, eps: float = 1e-8, weight_decay: float = 0, *, lr: float = 1.0,
                 backend: str = "auto", skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        super().__init__(params, dict(alpha=alpha, eps=eps, weight_decay=weight_decay, lr=lr), backend=backend,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def init_state(self, p, group):
        z = self.zeros_state
        return {"sum_negative_gradients": z(p), "grad_norm_sum": z(p),
                "L": self.zeros_state(p).fill_(group["eps"]),
                "reward": z(p), "x0": self.copy_of(p)}

    def _update(self, batch: StepBatch) -> None:
        if batch.rule_kernel:
            self._pass("cocob_accept")(batch)
            self._pass("cocob_step")(batch)
            return
        self._pass("cocob_step")(batch)
        self.S["steps"].add_(batch.ok.to(torch.float64))

    def _ref_cocob_step(self, batch: StepBatch) -> None:
        ok = batch.ok
        for c in R.chunks(batch):
            group = c.group
            x, x0, g = c.params, c.state("x0"), c.grads
            if group["weight_decay"] != 0:
                g = R.axpy(g, x, group["weight_decay"])
            if group["lr"] != 1.0:
                g = g * group["lr"]
            L = torch.maximum(c.state("L"), g.abs())
            theta = c.state("sum_negative_gradients") - g
            G = c.state("grad_norm_sum") + g.abs()
            reward = R.addcmul(c.state("reward"), g, x - x0, -1.0).clamp_min(0.0)
            denom = torch.maximum(G + L, L * group["alpha"]) * L
            x_new = (reward + L) * theta / denom + x0
            for key, value in (("L", L), ("sum_negative_gradients", theta), ("grad_norm_sum", G), ("reward", reward)):
                c.commit_state(key, value, ok)
            c.commit_params(x_new, ok)
