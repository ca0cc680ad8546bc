"""What the Polyak-type methods share: a loss-driven global step size along the raw gradient.

Each of them (Inexact Polyak, SPS, DecSPS, AdaSPS) is the same pipeline::

    stats:  Σg² over every active tensor (domain G)            (``_stats``; a fused backend reduces it)
    rule:   (loss, Σg², scalar state) → step size η and new scalar state   (the method's ``rule``)
    apply:  x ← x − lr_group · η · g

The group's ``lr`` is a multiplier on η (default 1) so ``torch.optim.lr_scheduler`` schedules compose.

Every method of the family states its rule as one function (``lrfree.scalar_math`` style)::

    rule(loss, grad_sq, steps, a, b, h, Q, V) -> (η, a', b', flag)

of the loss, the global Σg², the number of steps taken, its two scalar state entries ``rule_state``
(a', b' are committed if the step is accepted), its hyperparameter vector ``h`` (``_rule_hyperparameters``)
and two compile-time flags (``_rule_flags``); ``flag`` is a per-step boolean the method may use
(Inexact Polyak: the loss improved on the best one). The torch backend calls it on 0-d tensors, the
fused backends inside ``lrfree.kernels.sgd``'s rule kernel: one launch for the accept decision, the rule,
the counters and every tensor's coefficient.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch


class PolyakFamily(FusedOptimizer):
    requires_loss = True
    kernels = "sgd"
    fused_rule = True
    #: the store scalars the rule reads and rewrites besides ``step_size`` (a and b; at most two)
    rule_state: ClassVar[tuple[str, ...]] = ()
    #: the method's rule (module docstring); a staticmethod
    rule: ClassVar[Callable]

    def _rule_hyperparameters(self) -> tuple[float, ...]:
        """The host values the rule reads with ``M.at(h, i)``."""
        return ()

    def _rule_flags(self) -> tuple[bool, bool]:
        """The rule's compile-time flags (Q, V)."""
        return False, False

    def _stats(self, batch: StepBatch) -> torch.Tensor:
        """The statistic the rule needs: Σg² over every active element."""
        return batch.reduce(batch.grad_sq)

    def _rule(self, loss: torch.Tensor, grad_sq: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rule on 0-d tensors: the step size ``"step_size"``, the new ``rule_state`` and ``"flag"``."""
        S = self.S
        a, b = (S[name] for name in (self.rule_state + ("steps", "steps"))[:2])
        h = self._coefficient_vector(self._rule_hyperparameters() or (0.0,))
        step, a_new, b_new, flag = type(self).rule(loss, grad_sq, S["steps"], a, b, h, *self._rule_flags())
        return {"step_size": step, **dict(zip(self.rule_state, (a_new, b_new))), "flag": flag}

    def _update(self, batch: StepBatch) -> None:
        if batch.rule_kernel:  # one launch: the accept decision, the rule, the counters, the coefficients
            coef, flag = self._pass("polyak_rule")(batch, batch.local_grad_sq)
            self._apply(batch, coef, flag)
            return
        grad_sq = self._stats(batch)  # first: under data parallelism its collective also averages the loss
        new = self._rule(batch.loss, grad_sq)
        flag = new.pop("flag")
        self._set_all(new, batch.ok)
        self._apply(batch, new["step_size"] * batch.per_item("lr"), batch.ok & flag)
        self.S["steps"].add_(batch.ok.to(torch.float64))

    def _apply(self, batch: StepBatch, coef: torch.Tensor, flag: torch.Tensor) -> None:
        """``flag``: the accepted step's rule flag (bool, or int32 from the rule kernel)."""
        self._pass("sgd_apply")(batch, coef)

    def _ref_sgd_apply(self, batch, coef, decay=None, copy_best=None) -> None:
        R.sgd_apply_(batch, coef, decay, copy_best)


LR_MULTIPLIER = {"lr": V.NONNEG}
