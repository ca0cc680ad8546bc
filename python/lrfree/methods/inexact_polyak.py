"""Inexact Polyak Stepsize: parameter-free clipped gradient descent (Takezawa et al., NeurIPS 2024).

Algorithm 1 of "Parameter-free Clipped Gradient Descent Meets Polyak" (ALGORITHMS §1.3)::

    η_t = (f(x_t) − l*) / (√T · ‖∇f(x_t)‖²),     x_{t+1} = x_t − η_t ∇f(x_t)

with the horizon ``T`` (number of optimizer steps, fixed in advance) and a lower bound ``l*`` ≤ f*
(0 for non-negative losses) as the only inputs. Its convergence rate O(1/√T) does not depend on the
(L0, L1)-smoothness constants, i.e. it matches well-tuned clipped gradient descent without tuning.

Library policy where the paper is silent: ‖g‖ = 0 or f_t < l* gives η_t = 0 (no step); steps past
``T`` keep dividing by √T; there is no momentum, weight decay or ε. The best-iterate selection of
Algorithm 1 is optional (``best_iterate=True``, meant for full-batch objectives): the parameters
with the lowest loss seen are kept in state; :meth:`update_best` scores the current parameters without
stepping (call it once after the last step to consider x_T) and :meth:`load_best` writes them back.
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..distributed import local_real
from ..optimizer import StepBatch
from ..scalar_math import M
from ._polyak import LR_MULTIPLIER, PolyakFamily



def inexact_polyak_rule(loss, grad_sq, steps, best_loss, unused, h, Q, BEST):
    """Algorithm 1's step (PolyakFamily's signature): η = (f − l*)₊ / (√T ‖g‖²); h = (l*, √T). With
    ``BEST``, the flag says the loss improved on the best one (its parameters are kept), which it replaces."""
    lower_bound, sqrt_t = M.at(h, 0), M.at(h, 1)
    step = M.safe_div(M.maximum(loss - lower_bound, 0.0), sqrt_t * grad_sq, 0.0)
    improved = loss <= best_loss
    if BEST:
        best_loss = M.where(improved, loss, best_loss)
    return step, best_loss, unused, improved

class InexactPolyak(PolyakFamily):
    """Inexact Polyak Stepsize (Algorithm 1 of Takezawa et al., 2024).

    Args:
        params: parameters or param groups.
        T: the number of optimizer steps the run will take (the horizon of Algorithm 1).
        lower_bound: l*, a lower bound on the optimal loss (0 for non-negative losses).
        lr: multiplier on the step size (default 1); lets learning-rate schedulers compose.
        best_iterate: keep a copy of the parameters with the lowest loss seen (4 B/param more).
        backend: ``"auto"`` | ``"torch"`` | ``"triton"`` | ``"cuda"``.
        skip_nonfinite: skip (and count) steps whose loss or gradient is not finite.

    ``step(loss=loss)`` needs the loss whose gradient is in ``.grad``.
    """

    hyperparameters = {"T": V.integer(1), "lower_bound": V.ANY_REAL, "best_iterate": V.BOOL, **LR_MULTIPLIER}
    shared_hyperparameters = ("T", "lower_bound", "best_iterate")

    def __init__(self, params, T: int, lower_bound: float = 0.0, *, lr: float = 1.0, best_iterate: bool = False,
                 backend: str = "auto", skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        super().__init__(params, dict(T=T, lower_bound=lower_bound, lr=lr, best_iterate=best_iterate),
                         backend=backend, skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def init_state(self, p, group):
        return {"best": self.copy_of(p)} if group["best_iterate"] else {}

    def initial_scalars(self):
        return {"step_size": 0.0, "best_loss": math.inf}

    rule_state = ("best_loss",)

    def _rule_hyperparameters(self):
        hp = self.param_groups[0]
        return (hp["lower_bound"], math.sqrt(hp["T"]))

    def _rule_flags(self):
        return False, self.param_groups[0]["best_iterate"]

    rule = staticmethod(inexact_polyak_rule)

    def _apply(self, batch: StepBatch, coef: torch.Tensor, flag: torch.Tensor) -> None:
        if not self.param_groups[0]["best_iterate"]:
            return super()._apply(batch, coef, flag)
        # f(x_t) is scored before x_t moves: an improving step (flag) copies x_t into the best iterate in
        # the same pass that updates it; the rule has recorded its loss
        self._pass("sgd_apply")(batch, coef, copy_best=flag)
        active = {id(it.param) for it in batch.items}
        if any("best" in state and id(p) not in active for p, state in self.state.items()):
            self._record_if_best(None, flag.bool(), skip=active)

    # -- best iterate ---------------------------------------------------------------------------
    def _record_if_best(self, loss: torch.Tensor | None, improved: torch.Tensor, skip=frozenset()) -> None:
        """``best ← x`` (where ``improved``) for every parameter with a best copy not in ``skip``, and
        ``best_loss ← loss`` (None: the rule has)."""
        for p, state in self.state.items():
            if "best" in state and id(p) not in skip:
                R.commit_(state["best"], self._stepped(p), improved)
        if loss is not None:
            self._set("best_loss", loss, improved)

    @torch.no_grad()
    def update_best(self, loss) -> None:
        """Score the current parameters with their loss, without stepping (e.g. x_T after the last step)."""
        if not self.param_groups[0]["best_iterate"]:
            raise ValueError("InexactPolyak.update_best needs best_iterate=True")
        loss_t = self._loss_tensor(loss)
        self._gather()  # creates the best-iterate copies for parameters not seen yet
        self._sync_store()
        self._record_if_best(loss_t, torch.isfinite(loss_t) & (loss_t <= self.S["best_loss"]))

    @torch.no_grad()
    def load_best(self) -> None:
        """Copy the best iterate found so far into the parameters."""
        if not self.param_groups[0]["best_iterate"]:
            raise ValueError("InexactPolyak.load_best needs best_iterate=True")
        for p, state in self.state.items():
            if "best" in state:
                self._stepped(p).copy_(state["best"])
                if "master" in state:
                    local_real(p).copy_(state["master"])
