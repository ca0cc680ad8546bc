"""What the D-Adaptation family shares (D-Adapt SGD/Adam, Prodigy, PS-DA-SGD): one global step-size
multiplier γ taken from the param groups with the reference packages' semantics."""

from __future__ import annotations

import torch

from ..optimizer import FusedOptimizer


class DAdaptBase(FusedOptimizer):
    def _adam_step_size(self, lr: float) -> torch.Tensor:
        """λ_k = d_k γ bc_k, bc_k = √(1−β2^{k+1}) / (1−β1^{k+1}) with bias correction (else 1), the
        step of the Adam-direction members (D-Adapt Adam, Prodigy); betas and the flag from group 0."""
        hp = self.param_groups[0]
        beta1, beta2 = hp["betas"]
        k = self.S["steps"]
        bias_correction = ((1 - beta2 ** (k + 1)).sqrt() / (1 - beta1 ** (k + 1))
                           if hp["use_bias_correction"] else 1.0)
        return self.S["d"] * lr * bias_correction

    def _shared_lr(self) -> float:
        """γ = the largest group lr; like the references, other groups may only use γ or 0 (frozen)."""
        lr = max(group["lr"] for group in self.param_groups)
        for i, group in enumerate(self.param_groups):
            if group["lr"] not in (lr, 0.0):
                raise ValueError(
                    f"{type(self).__name__} param_groups[{i}]: lr={group['lr']!r} but another group uses "
                    f"lr={lr!r}; the adapted step is global, so group lrs must all be equal or 0")
        return lr
