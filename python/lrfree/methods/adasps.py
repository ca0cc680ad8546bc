"""AdaSPS: adaptive stochastic Polyak step size (Jiang & Stich, NeurIPS 2023).

Global domain (ALGORITHMS §4.3)::

    η_t = min{ (f_t − l*) / (c_p ‖g_t‖² √(Σ_{s≤t} (f_s − l*))),  η_{t−1} },   η_{−1} = +∞
    x_{t+1} = x_t − η_t g_t

The step size never increases. ``c_p`` has no universal default in the paper (its theory ties it to
the initial gap); 1.0 is used here. AdaSPS is not invariant to rescaling the loss by c: the update
scales by c^(−1/2) unless ``c_p`` is rescaled to c_p/√c. Library policy: the gap (f_t − l*) is
clamped at 0; ‖g_t‖ = 0 takes no step and keeps η_{t−1}.
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..scalar_math import M
from ._polyak import LR_MULTIPLIER, PolyakFamily



def adasps_rule(loss, grad_sq, steps, eta_prev, gap_sum, h, Q, V):
    """AdaSPS's rule (PolyakFamily's signature); h = (c_p, l*)."""
    c_p, lower_bound = M.at(h, 0), M.at(h, 1)
    gap = M.maximum(loss - lower_bound, 0.0)
    gap_sum = gap_sum + gap
    ratio = M.safe_div(gap, c_p * grad_sq * M.sqrt(gap_sum), float("inf"))
    ratio = M.where(gap > 0, ratio, 0.0)
    eta = M.minimum(ratio, eta_prev)
    step = M.where(grad_sq > 0, eta, 0.0)  # no gradient, no step (η may be ∞)
    return step, eta, gap_sum, grad_sq > 0

class AdaSPS(PolyakFamily):
    """Adaptive SPS.

    Args:
        params: parameters or param groups.
        c_p: the AdaSPS constant.
        lower_bound: l*, a lower bound on the optimal loss (0 for non-negative losses).
        lr: multiplier on the step size (default 1).
    """

    hyperparameters = {"c_p": V.POSITIVE, "lower_bound": V.ANY_REAL, **LR_MULTIPLIER}
    shared_hyperparameters = ("c_p", "lower_bound")

    def __init__(self, params, c_p: float = 1.0, lower_bound: float = 0.0, *, lr: float = 1.0,
                 backend: str = "auto", skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        super().__init__(params, dict(c_p=c_p, lower_bound=lower_bound, lr=lr), backend=backend,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def initial_scalars(self):
        # eta_prev: the running minimum η_{t-1}; step_size: the η applied in the last step.
        return {"step_size": 0.0, "eta_prev": math.inf, "gap_sum": 0.0}

    rule_state = ("eta_prev", "gap_sum")

    def _rule_hyperparameters(self):
        hp = self.param_groups[0]
        return (hp["c_p"], hp["lower_bound"])

    rule = staticmethod(adasps_rule)
