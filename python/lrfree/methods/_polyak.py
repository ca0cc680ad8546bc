"""What the Polyak-type methods share: a loss-driven global step size along the raw gradient.

Each of them (Inexact Polyak, SPS, DecSPS, AdaSPS) reduces Σg² over every active tensor (domain G),
turns it and the loss into one step size η on device, and applies ``x <- x - lr_group * η * g``.
The group's ``lr`` is a multiplier on η (default 1) so ``torch.optim.lr_scheduler`` schedules compose.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch


class PolyakFamily(FusedOptimizer):
    requires_loss = True

    def _grad_sq_total(self, batch: StepBatch) -> torch.Tensor:
        return batch.total(batch.grad_sq)

    def _apply_step(self, batch: StepBatch, eta: torch.Tensor) -> None:
        R.sgd_apply_(batch.items, [eta * it.group["lr"] for it in batch.items], batch.ok)
        self._set("step_size", eta, batch.ok)
        self.S["steps"].add_(batch.ok.to(torch.float64))


LR_MULTIPLIER = {"lr": V.NONNEG}
