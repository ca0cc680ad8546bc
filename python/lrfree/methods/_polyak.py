"""What the Polyak-type methods share: a loss-driven global step size along the raw gradient.

Each of them (Inexact Polyak, SPS, DecSPS, AdaSPS) is the same pipeline::

    stats:  Σg² over every active tensor (domain G)            (``_stats``; a fused backend reduces it)
    rule:   (loss, Σg², scalar state) → step size η and new scalar state   (``_rule``: 0-d tensors only)
    apply:  x ← x − lr_group · η · g

The group's ``lr`` is a multiplier on η (default 1) so ``torch.optim.lr_scheduler`` schedules compose.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch


class PolyakFamily(FusedOptimizer):
    requires_loss = True
    kernels = "sgd"

    def _stats(self, batch: StepBatch) -> torch.Tensor:
        """The statistic the rule needs: Σg² over every active element."""
        return batch.reduce(batch.grad_sq)

    def _rule(self, loss: torch.Tensor, grad_sq: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's scalar rule: the step size ``"step_size"`` and the new scalar state, from 0-d
        device tensors only (shared by every backend)."""
        raise NotImplementedError

    def _update(self, batch: StepBatch) -> None:
        grad_sq = self._stats(batch)  # first: under data parallelism its collective also averages the loss
        new = self._rule(batch.loss, grad_sq)
        for name, value in new.items():
            self._set(name, value, batch.ok)
        self._apply(batch, new["step_size"] * batch.per_item("lr"))
        self.S["steps"].add_(batch.ok.to(torch.float64))

    def _apply(self, batch: StepBatch, coef: torch.Tensor) -> None:
        self._pass("sgd_apply")(batch, coef)

    def _ref_sgd_apply(self, batch, coef, decay=None, copy_best=None) -> None:
        R.sgd_apply_(batch, coef, decay, copy_best)


LR_MULTIPLIER = {"lr": V.NONNEG}
