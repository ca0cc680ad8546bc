"""What the D-Adaptation family shares (D-Adapt SGD/Adam, Prodigy, PS-DA-SGD): one global step-size
multiplier γ taken from the param groups with the reference packages' semantics."""

from __future__ import annotations

from ..optimizer import FusedOptimizer


class DAdaptBase(FusedOptimizer):
    def _shared_lr(self) -> float:
        """γ = the largest group lr; like the references, other groups may only use γ or 0 (frozen)."""
        lr = max(group["lr"] for group in self.param_groups)
        for i, group in enumerate(self.param_groups):
            if group["lr"] not in (lr, 0.0):
                raise ValueError(
                    f"{type(self).__name__} param_groups[{i}]: lr={group['lr']!r} but another group uses "
                    f"lr={lr!r}; the adapted step is global, so group lrs must all be equal or 0")
        return lr
