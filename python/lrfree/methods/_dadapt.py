"""What the D-Adaptation family shares (D-Adapt SGD/Adam, Prodigy, PS-DA-SGD): one global step-size
multiplier γ taken from the param groups with the reference packages' semantics, and the per-group-d
option.

``per_group_d=False`` (default) is the reference semantics: one d for the whole optimizer, estimated from
every group's statistics, with the rule's hyperparameters (betas, d0, growth rate, ...) from group 0 and
group lrs equal or 0. ``per_group_d=True`` steps every param group as its own D-Adaptation optimizer:
its own d, numerator, step counter and hyperparameters, and its own lr as γ. A group with a very
different gradient scale (embeddings, norms) then no longer sets the step of the others. It costs one
set of passes per group (launches × groups) and, under data parallelism, one sync point per group.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..optimizer import FusedOptimizer, StepBatch


class DAdaptBase(FusedOptimizer):
    def __init__(self, params, defaults: dict, *, per_group_d: bool = False, **options):
        V.BOOL(type(self).__name__, "per_group_d", per_group_d)
        self.per_group_d = per_group_d
        self._current_group: int | None = None
        super().__init__(params, defaults, **options)

    def _validate_hyperparameters(self, owner, index, group, first):
        if not self.per_group_d:
            return super()._validate_hyperparameters(owner, index, group, first)
        # every group is its own optimizer: nothing has to match group 0
        V.validate_group(owner, index, group, self.hyperparameters)

    # -- hooks of each member ----------------------------------------------------------------------
    def _d_scalars(self, group: dict) -> dict[str, float]:
        """The step-size rule's scalars and their initial values (from ``group``'s hyperparameters)."""
        raise NotImplementedError

    def _update_d(self, batch: StepBatch) -> None:
        """One step of the method over ``batch`` with the scalars in ``self.S``."""
        raise NotImplementedError

    # -- one d, or one per group --------------------------------------------------------------------
    def initial_scalars(self):
        return {} if self.per_group_d else self._d_scalars(self.param_groups[0])

    def initial_group_scalars(self, group):
        # per group: the rule's scalars and the step counter its bias correction reads
        return {**self._d_scalars(group), "group_steps": 0.0} if self.per_group_d else {}

    def rule_group(self, group: dict | None = None) -> dict:
        if not self.per_group_d:
            return self.param_groups[0]
        return group if group is not None else self.param_groups[self._current_group]

    def _update(self, batch: StepBatch) -> None:
        if not self.per_group_d:
            return self._update_d(batch)
        store = self._scalar_store
        per_group = [name for name, domain in self._scalar_domain.items() if domain == "group"]
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(batch.items):
            groups.setdefault(it.group_index, []).append(i)
        try:
            for gi, index in groups.items():
                # 0-d views into the per-group vectors: the method's in-place writes land in group gi's slot
                self._scalar_view = {**store, **{name: store[name][gi] for name in per_group},
                                     "steps": store["group_steps"][gi]}
                self._current_group = gi
                self._update_d(batch.subset(index))
        finally:
            self._scalar_view, self._current_group = None, None
        # the optimizer-wide count: steps taken by any group (each group counts its own in "group_steps")
        store["steps"].add_(batch.ok.to(torch.float64))

    # -- shared pieces of the members' rules --------------------------------------------------------
    def _adam_step_size(self, lr: float) -> torch.Tensor:
        """λ_k = d_k γ bc_k, bc_k = √(1−β2^{k+1}) / (1−β1^{k+1}) with bias correction (else 1), the
        step of the Adam-direction members (D-Adapt Adam, Prodigy); betas and the flag from the rule group."""
        hp = self.rule_group()
        beta1, beta2 = hp["betas"]
        k = self.S["steps"]
        bias_correction = ((1 - beta2 ** (k + 1)).sqrt() / (1 - beta1 ** (k + 1))
                           if hp["use_bias_correction"] else 1.0)
        return self.S["d"] * lr * bias_correction

    def _shared_lr(self) -> float:
        """γ: the group's own lr with per-group d; else the largest group lr, and like the references,
        other groups may only use γ or 0 (frozen)."""
        if self.per_group_d:
            return self.rule_group()["lr"]
        lr = max(group["lr"] for group in self.param_groups)
        for i, group in enumerate(self.param_groups):
            if group["lr"] not in (lr, 0.0):
                raise ValueError(
                    f"{type(self).__name__} param_groups[{i}]: lr={group['lr']!r} but another group uses "
                    f"lr={lr!r}; the adapted step is global, so group lrs must all be equal or 0 "
                    "(or pass per_group_d=True)")
        return lr

    def _first_rise_d0(self) -> float:
        """The d0 Prodigy compares d with to detect its first rise: the last group's, a quirk of the
        reference's loop variable (ALGORITHMS §4.7); the group's own with per-group d."""
        return self.rule_group()["d0"] if self.per_group_d else self.param_groups[-1]["d0"]
