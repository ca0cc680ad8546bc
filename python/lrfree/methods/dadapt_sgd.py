"""D-Adapt SGD (Defazio & Mishchenko, ICML 2023), semantics of the official ``dadaptation`` 3.2.

One global distance estimate d (domain G; ALGORITHMS §4.5). Step k, with γ = max of the group lrs and
c = lr/γ the group's lr ratio (1 or 0 in the reference, which accepts nothing else)::

    ‖g_0‖² = Σ c ‖g‖² at the first non-zero gradient (groups with lr > 0, before weight decay)
    λ_k = d_k γ / ‖g_0‖
    g ← g + wd·x;   N += λ_k ⟨g, s⟩;   s ← s + c λ_k g;   Q = Σ ‖s‖² / c     (groups with lr > 0)
    d_{k+1} = max(d_k, min(2N/√Q, d_k · growth_rate))
    x ← β x + (1 − β)(x_0 − s)                                             (β = momentum)

A group's lr ratio c is D-Adapt SGD run on the reparametrized network x = √c·u (methods/_dadapt.py
derives it): its step is c times the shared one, and Q measures s in the u coordinates; with c ∈ {0, 1}
this is the reference's arithmetic exactly. ``momentum``, ``weight_decay`` and ``growth_rate`` come from
param group 0, like the reference. The update of step k does not use d_{k+1}, so a fused backend does
it in one pass. State: s and x_0 (z = x_0 − s is not stored).

Where the reference would crash or sync, this implementation is predicated on device: Q = 0 leaves
x, d and N unchanged; ‖g_0‖ is the first *non-zero* gradient norm (the reference divides by zero when
the first gradient is all zero).
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import StepBatch
from ..scalar_math import M
from ._dadapt import DAdaptBase


def dadapt_sgd_step_size(d, g0_norm, grad_sq, lr):
    """λ_k = d_k γ / ‖g_0‖, fixing ‖g_0‖ at the first non-zero gradient norm (``grad_sq`` = Σ c ‖g‖² of
    this step, used while the stored ‖g_0‖ is 0): returns (‖g_0‖, λ_k)."""
    g0_norm = M.where(g0_norm > 0, g0_norm, M.sqrt(grad_sq))
    return g0_norm, M.safe_div(d * lr, g0_norm, 0.0)


def distance_rule(d, numerator, s_sq, growth_rate, ADAPT):
    """D-Adapt SGD's rule: d̂ = 2N/‖s‖,  d_{k+1} = max(d_k, min(d̂, d_k · growth_rate)), d frozen unless
    ``ADAPT`` (γ > 0); returns (d̂, d_{k+1}, whether ‖s‖ > 0, i.e. whether there is anything to estimate)."""
    d_hat = M.safe_div(2.0 * numerator, M.sqrt(s_sq), 0.0)
    if ADAPT:
        d_next = M.maximum(d, M.minimum(d_hat, d * growth_rate))
    else:
        d_next = d
    return d_hat, d_next, s_sq > 0


def distance_estimate(lr: float, d: torch.Tensor, numerator: torch.Tensor, s_sq: torch.Tensor,
                      growth_rate: float) -> dict[str, torch.Tensor]:
    """:func:`distance_rule` on 0-d tensors, as a dict of the new scalars. PS-DA-SGD runs the same rule
    with the α-weighted norm ‖α ⊙ s‖."""
    d_hat, d_next, _ = distance_rule(d, numerator, s_sq, growth_rate, lr > 0)
    return {"numerator": numerator, "d_hat": d_hat, "d": d_next}


class DAdaptSGD(DAdaptBase):
    """SGD with D-Adaptation of the step size.

    Args:
        params: parameters or param groups.
        lr: multiplier γ on the adapted step (1.0; schedule it with an lr_scheduler). Groups may differ:
            γ is the largest group lr and a group with lr = c·γ takes c times the shared step, with d
            estimated as D-Adapt SGD on the network reparametrized by x = √c·u (module docstring); a
            group with lr = 0 never moves and adds nothing to d.
        momentum: primal-averaging momentum β in [0, 1).
        weight_decay: coupled L2 penalty.
        log_every: accepted for compatibility with ``dadaptation``; use :meth:`scalars` to log.
        d0: initial distance estimate.
        growth_rate: cap on the per-step growth of d (inf: uncapped).
        fsdp_in_use: accepted for compatibility; sharded training is handled by lrfree.distributed.
    """

    hyperparameters = {"lr": V.NONNEG, "momentum": V.UNIT_INTERVAL, "weight_decay": V.NONNEG,
                       "log_every": V.integer(0), "d0": V.POSITIVE, "growth_rate": V.GROWTH, "fsdp_in_use": V.BOOL}
    kernels = "dadapt_sgd"
    low_precision_state = ("s",)
    fused_rule = True

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0, log_every: int = 0,
                 d0: float = 1e-6, growth_rate: float = math.inf, fsdp_in_use: bool = False, *,
                 backend: str = "auto", skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None,
                 per_group_d: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, log_every=log_every, d0=d0,
                        growth_rate=growth_rate, fsdp_in_use=fsdp_in_use)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded,
                         per_group_d=per_group_d)

    def init_state(self, p, group):
        return {"s": self.zeros_state(p), "x0": self.copy_of(p)}

    def _d_scalars(self, group):
        d0 = group["d0"]
        return {"d": d0, "d_hat": d0, "numerator": 0.0, "g0_norm": 0.0, "step_size": 0.0}

    def _update_d(self, batch: StepBatch) -> None:
        hp = self.rule_group()
        lr = self._shared_lr()
        ratios = self._lr_ratios(batch)
        if batch.rule_kernel:
            # rule kernel: accept, λ and every tensor's c λ; the pass; rule kernel: N, Q, d, the store
            steps, pending = self._pass("dadapt_sgd_step_size")(batch, lr, ratios)
            stats = self._pass("dadapt_sgd_step")(batch, steps, hp["weight_decay"], hp["momentum"])
            self._pass("dadapt_sgd_distance")(batch, lr, ratios, stats, pending)
            return
        S = self.S
        keep = [i for i, c in enumerate(ratios) if c > 0]
        adapting = batch.subset(keep)
        # ‖g0‖² = Σ c ‖g‖² (the gradient in the reparametrized coordinates is √c g), only until it is
        # known: from the guard's pass, or a small launch that stops streaming then
        g0_norm, dlr = dadapt_sgd_step_size(S["d"], S["g0_norm"], adapting.grad_sq_until(
            S["g0_norm"] > 0, batch.vector(ratios[i] for i in keep)), lr)
        ok = batch.ok  # after the first collective (data parallel), which settles it
        # one pass: ⟨g, s_old⟩ and ‖s_new‖² per tensor, s += c λ g and x updated
        stats, = batch.sync(self._pass("dadapt_sgd_step")(batch, dlr * batch.vector(ratios), hp["weight_decay"],
                                                           hp["momentum"]))
        # Q = Σ ‖s‖²/c: ‖s‖ in the reparametrized coordinates (lr = 0 tensors have no s and weigh 0)
        s_sq = batch.reduce(batch.vector(1.0 / c if c > 0 else 0.0 for c in ratios) * stats[:, 1])
        numerator = batch.reduce(dlr * stats[:, 0], start=S["numerator"])
        d_hat, d_next, estimable = distance_rule(S["d"], numerator, s_sq, hp["growth_rate"], lr > 0)
        # s = 0 everywhere (no gradient yet): nothing to estimate; x moved only toward x0 = x
        proceed = ok & estimable
        new = dict(numerator=numerator, d_hat=d_hat, d=d_next, step_size=dlr, g0_norm=g0_norm)
        self._set_all(new, proceed)
        S["steps"].add_(proceed.to(torch.float64))

    def _ref_dadapt_sgd_step(self, batch: StepBatch, steps: torch.Tensor, decay: float, beta: float) -> torch.Tensor:
        """``steps``: every tensor's c λ (fp64, one per item)."""
        ok = batch.ok
        averaging = 1.0 - beta  # the reference's ck: x <- x (1 - ck) + ck z

        def step(c: R.Chunk) -> torch.Tensor:
            x, g = c.params, c.grads
            if decay != 0:
                g = R.axpy(g, x, decay)
            if c.group["lr"] > 0:
                s = c.state("s")
                s_next = R.axpy(s, g, c.per_tensor(steps))
                stats = torch.stack([c.dot(g, s), c.sumsq(s_next)], dim=1)
                c.commit_state("s", s_next, ok)
            else:
                stats = torch.zeros(len(c), 2, dtype=torch.float64, device=batch.device)
            z = c.state("x0") - c.state("s")  # s as committed
            c.commit_params(R.axpy(x * (1.0 - averaging), z, averaging), ok)
            return stats
        return R.per_item(batch, step)
