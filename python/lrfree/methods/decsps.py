"""DecSPS: decreasing stochastic Polyak step size (Orvieto, Lacoste-Julien, Loizou, NeurIPS 2022).

The rule of the authors' ``SPS_decr`` (aorvieto/DecSPS, ALGORITHMS §4.2), global domain::

    c_t = c0 · √(t+1)            ('sqrt')   or   c0 · (t+1)   ('linear');   c_{−1} = c0,  γ_{−1} = γ_b
    γ_t = min{ (f_t − l*) / ‖g_t‖²,  c_{t−1} γ_{t−1} } / c_t
    x_{t+1} = x_t − γ_t g_t

so γ_t never increases. Note that c_t γ_t is simply the running minimum of the Polyak ratios
(capped by c0 γ_b); that is the only scalar state besides t. ``reference_quirks=True`` reproduces the
reference's computation of the ratio as f_t / ‖g_t + 1e-4‖² (1e-4 added to every gradient element,
no clamp of negative values); by default the ratio is (f_t − l*)₊ / ‖g_t‖² and ‖g_t‖ = 0 keeps the
previous value.
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import StepBatch
from ..scalar_math import M
from ._polyak import LR_MULTIPLIER, PolyakFamily

QUIRK_GRAD_OFFSET = 1e-4



def decsps_rule(loss, grad_sq, steps, c_gamma, unused, h, QUIRKS, SQRT):
    """DecSPS's rule (PolyakFamily's signature); h = (c0, l*); c_gamma = c_{t−1} γ_{t−1}."""
    c0, lower_bound = M.at(h, 0), M.at(h, 1)
    if SQRT:
        c_t = c0 * M.sqrt(steps + 1.0)
    else:
        c_t = c0 * (steps + 1.0)
    if QUIRKS:
        ratio = loss / grad_sq
    else:
        ratio = M.safe_div(M.maximum(loss - lower_bound, 0.0), grad_sq, float("inf"))
    c_gamma = M.minimum(ratio, c_gamma)
    return c_gamma / c_t, c_gamma, unused, grad_sq > 0

class DecSPS(PolyakFamily):
    """Decreasing SPS.

    Args:
        params: parameters or param groups.
        c0: scale of the decreasing sequence c_t (1.0 in the reference notebooks).
        gamma_b: initial upper bound on the step size (10.0 in the reference notebooks).
        lower_bound: l*, a lower bound on the optimal loss.
        decay: ``"sqrt"`` (c_t = c0 √(t+1), the paper's choice) or ``"linear"``.
        reference_quirks: reproduce the reference's +1e-4 in the gradient norm.
        lr: multiplier on the step size (default 1).
    """

    hyperparameters = {"c0": V.POSITIVE, "gamma_b": V.POSITIVE_OR_INF, "lower_bound": V.ANY_REAL,
                       "decay": V.choice("sqrt", "linear"), "reference_quirks": V.BOOL, **LR_MULTIPLIER}
    shared_hyperparameters = ("c0", "gamma_b", "lower_bound", "decay", "reference_quirks")

    def __init__(self, params, c0: float = 1.0, gamma_b: float = 10.0, lower_bound: float = 0.0, *,
                 decay: str = "sqrt", reference_quirks: bool = False, lr: float = 1.0, backend: str = "auto",
                 skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        defaults = dict(c0=c0, gamma_b=gamma_b, lower_bound=lower_bound, decay=decay,
                        reference_quirks=reference_quirks, lr=lr)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def initial_scalars(self):
        hp = self.param_groups[0]
        return {"step_size": 0.0, "c_gamma": hp["c0"] * hp["gamma_b"]}

    def _stats(self, batch: StepBatch) -> torch.Tensor:
        if self.param_groups[0]["reference_quirks"]:
            # reproducing the reference is a testing aid: its statistic runs in plain torch on any backend
            return batch.sync(batch.total(R.sumsq(R.up(it.g, it.p) + QUIRK_GRAD_OFFSET) for it in batch.items))[0]
        return super()._stats(batch)

    rule_state = ("c_gamma",)

    def _rule_hyperparameters(self):
        hp = self.param_groups[0]
        return (hp["c0"], hp["lower_bound"])

    def _rule_flags(self):
        hp = self.param_groups[0]
        return hp["reference_quirks"], hp["decay"] == "sqrt"

    def _has_rule_kernel(self) -> bool:
        return not self.param_groups[0]["reference_quirks"]  # its statistic is torch-only (_stats)

    rule = staticmethod(decsps_rule)
