"""SPS: stochastic Polyak step size (Loizou, Vaswani, Laradji, Lacoste-Julien, AISTATS 2021).

Semantics of the authors' ``Sps`` class (IssamLaradji/sps, ALGORITHMS §4.1), one global step size::

    polyak_t = (f_t − f*) / (c ‖g_t‖² + eps)
    'constant':     γ_t = min(polyak_t, eta_max)                   (0 if f_t < f*)
    'smooth_iter':  γ_t = min(gamma^(1/n_batches_per_epoch) · γ_{t−1}, polyak_t),  γ_{−1} = init_step_size
    x_{t+1} = x_t − γ_t g_t          (no step at all when ‖g_t‖ < 1e-8)

``smooth_iter`` (the reference's default) caps the growth of the step to a factor ``gamma`` per epoch.
Two behaviours of the reference are kept only behind ``reference_quirks=True``: it ignores ``f_star``
(and ``eta_max``) in ``smooth_iter`` mode and does not clamp a negative Polyak value there, and a
step skipped for a tiny gradient stores γ = 0, after which ``smooth_iter`` is stuck at 0 forever. By
default ``f_star`` and ``eta_max`` apply in both modes, negative values are clamped to 0, and a tiny
gradient leaves γ_{t−1} untouched.
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..scalar_math import M
from ._polyak import LR_MULTIPLIER, PolyakFamily

TINY_GRAD_NORM = 1e-8


def sps_rule(loss, grad_sq, steps, smooth_ref, unused, h, QUIRKS, SMOOTH):
    """SPS's rule (PolyakFamily's signature); h = (c, f_star, eta_max, eps, growth per step)."""
    c, f_star, eta_max, eps, growth = M.at(h, 0), M.at(h, 1), M.at(h, 2), M.at(h, 3), M.at(h, 4)
    grad_norm = M.sqrt(grad_sq)
    tiny = grad_norm < TINY_GRAD_NORM
    if QUIRKS:
        grad_sq = grad_norm * grad_norm  # the reference squares the norm back: same rounding
    if SMOOTH and QUIRKS:
        gap = loss
    else:
        gap = loss - f_star
    polyak = gap / (c * grad_sq + eps)
    if SMOOTH:
        cap = growth * smooth_ref
        if QUIRKS:
            gamma = M.minimum(cap, polyak)
        else:
            gamma = M.minimum(M.minimum(cap, M.maximum(polyak, 0.0)), eta_max)
    else:
        gamma = M.where(gap < 0, 0.0, M.minimum(polyak, eta_max))
    gamma = M.where(tiny, 0.0, gamma)
    if QUIRKS:
        new_ref = gamma
    else:
        new_ref = M.where(tiny, smooth_ref, gamma)
    return gamma, new_ref, unused, tiny


class SPS(PolyakFamily):
    """Stochastic Polyak step size (SPS_max / smoothed SPS).

    Args:
        params: parameters or param groups.
        c: the Polyak constant (0.5 as in the paper).
        f_star: the optimal loss value (lower bound); 0 for interpolating models.
        eta_max: upper bound γ_b on the step size (None: no bound).
        adapt_flag: ``"smooth_iter"`` (reference default) or ``"constant"`` (SPS_max).
        n_batches_per_epoch, init_step_size, gamma: the ``smooth_iter`` growth cap.
        eps: added to the denominator c‖g‖².
        reference_quirks: reproduce the reference implementation exactly (see module docstring).
        lr: multiplier on the step size (default 1).
    """

    hyperparameters = {
        "c": V.POSITIVE, "f_star": V.ANY_REAL, "eta_max": V.optional(V.POSITIVE_OR_INF),
        "adapt_flag": V.choice("smooth_iter", "constant"), "n_batches_per_epoch": V.integer(1),
        "init_step_size": V.NONNEG, "gamma": V.real(1.0, allow_inf=True), "eps": V.NONNEG,
        "reference_quirks": V.BOOL, **LR_MULTIPLIER,
    }
    shared_hyperparameters = ("c", "f_star", "eta_max", "adapt_flag", "n_batches_per_epoch", "init_step_size",
                              "gamma", "eps", "reference_quirks")

    def __init__(self, params, c: float = 0.5, f_star: float = 0.0, *, eta_max: float | None = None,
                 adapt_flag: str = "smooth_iter", n_batches_per_epoch: int = 500, init_step_size: float = 1.0,
                 gamma: float = 2.0, eps: float = 1e-8, reference_quirks: bool = False, lr: float = 1.0,
                 backend: str = "auto", skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        defaults = dict(c=c, f_star=f_star, eta_max=eta_max, adapt_flag=adapt_flag,
                        n_batches_per_epoch=n_batches_per_epoch, init_step_size=init_step_size, gamma=gamma,
                        eps=eps, reference_quirks=reference_quirks, lr=lr)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def initial_scalars(self):
        # step_size: γ applied in the last step; smooth_ref: γ_{t-1} that bounds the next smooth step.
        return {"step_size": 0.0, "smooth_ref": float(self.param_groups[0]["init_step_size"])}

    rule_state = ("smooth_ref",)

    def _rule_hyperparameters(self):
        hp = self.param_groups[0]
        growth = hp["gamma"] ** (1.0 / hp["n_batches_per_epoch"])
        return (hp["c"], hp["f_star"], math.inf if hp["eta_max"] is None else hp["eta_max"], hp["eps"], growth)

    def _rule_flags(self):
        hp = self.param_groups[0]
        return hp["reference_quirks"], hp["adapt_flag"] == "smooth_iter"

    rule = staticmethod(sps_rule)

