"""What the D-Adaptation family shares (D-Adapt SGD/Adam, Prodigy, PS-DA-SGD): one global step-size
multiplier γ taken from the param groups, per-group lr multipliers, and the per-group-d option.

``per_group_d=False`` (default): one d for the whole optimizer, estimated from every group's statistics,
with the rule's hyperparameters (betas, d0, growth rate, ...) from group 0, as in the reference packages.
``per_group_d=True`` steps every param group as its own D-Adaptation optimizer: its own d, numerator,
step counter and hyperparameters, and its own lr as γ. A group with a very different gradient scale
(embeddings, norms) then no longer sets the step of the others. It costs one set of passes per group
(launches × groups) and, under data parallelism, one sync point per group. A step is still taken or
rejected as a whole (a non-finite gradient in any group skips every group's step); with rule kernels
the first group's makes that decision for all (kernels/_dadapt.py).

Per-group lr with one shared d
------------------------------
γ is the largest group lr and every group's lr is read as γ·c_g with c_g = lr_g/γ ∈ [0, 1]; the reference
packages accept only c_g ∈ {0, 1}. A fixed c_g is a reparametrization of group g, and each method runs
its own rule, unchanged, in the reparametrized coordinates [DERIVED]:

* SGD-direction methods (D-Adapt SGD): x_g = √c_g·u_g. Then ∇_u = √c_g·g and an SGD step λ in u is the
  step c_g·λ in x. Mapped back to x (s kept as the displacement of x, so x = x0 − s as before)::

      ‖g_0‖² = Σ_g c_g ‖g_{0,g}‖²,  s_g += c_g λ g,  N += λ ⟨g, s⟩ (unchanged),  Q = Σ_g ‖s_g‖² / c_g

  and d estimates the distance in the u coordinates, √(Σ_g ‖x0_g − x*_g‖² / c_g).
* Adam-direction methods (D-Adapt Adam, Prodigy, PS-DA-SGD), whose direction does not change when a
  gradient is scaled: x_g = c_g·u_g (then ∇_u = c_g g, which the direction ignores, and a step δ in u
  moves x by c_g·δ). D-Adapt Adam: group g's ``layer_scale`` r_g becomes r_g·c_g (the reference's own
  layer_scale *is* this reparametrization, up to ε). Prodigy: the step (and the decoupled decay) × c_g, s accumulates c_g·(d/d0)λ g,
  the numerator ⟨g, p0 − x⟩ is unchanged. PS-DA-SGD: the step × c_g (s is the displacement),
  n_0² = Σ c_g ‖g/α‖², rms(α_0)² = Σ c_g α² / n, ‖α ⊙ s‖² → Σ_g ‖α ⊙ s_g‖² / c_g.

The reparametrization is exact up to ε (an exact one would use ε·c_g in group g) and up to weight
decay, which lrfree scales with the group's lr as torch does (decoupled: the decay step is c_g·wd·λ·x),
so that a group with lr = 0 never moves — also when it is frozen mid-training — and contributes nothing
to d (c_g = 0 drops it from every statistic, as the references drop lr-0 groups). Equal lrs (all
c_g ∈ {0, 1}) give exactly the references' arithmetic. A scheduler that scales every group's lr by one
factor (StepLR, CosineAnnealingLR, LinearLR, a LambdaLR with one lambda) changes γ, not c. If the ratios
themselves change during training, the accumulated statistics keep the ratios they were made with,
except that the denominator of D-Adapt SGD and PS-DA-SGD weights the accumulated s with the current
1/c_g: exact for fixed ratios; when a ratio drops, d̂ can only drop, which d ignores (it never
decreases); when one rises, the group's earlier s is counted at the new ratio — an approximation (the
exact weights would need the unweighted sum of the group's steps, one more state tensor).
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..optimizer import FusedOptimizer, StepBatch
from ..scalar_math import M


def adam_step_size(d, lr, steps, beta1, beta2, BIAS_CORRECTION):
    """λ_k = d_k γ bc_k with bc_k = √(1−β2^{k+1}) / (1−β1^{k+1}) under ``BIAS_CORRECTION`` (else 1): the step
    of the Adam-direction members (D-Adapt Adam, Prodigy); ``steps`` = k, the steps taken so far
    (``lrfree.scalar_math`` rule: the torch backend and the members' rule kernels run this function)."""
    if BIAS_CORRECTION:
        k = steps + 1
        step = d * lr * (M.sqrt(1 - M.pow(beta2, k)) / (1 - M.pow(beta1, k)))
    else:
        step = d * lr
    return step


class DAdaptBase(FusedOptimizer):
    def __init__(self, params, defaults: dict, *, per_group_d: bool = False, **options):
        V.BOOL(type(self).__name__, "per_group_d", per_group_d)
        self.per_group_d = per_group_d
        self._current_group: int | None = None
        # per-group d on a rule-kernel step: the whole step, whose accept decision the groups share
        self._whole_step: StepBatch | None = None
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
        subsets = {gi: batch.subset(index) for gi, index in groups.items()}
        if batch.rule_kernel:
            # the first group's rule kernel decides for the whole step (kernels/_dadapt.py), from a witness
            # that covers every group: the guard's Σg² pass over the whole step, run after the subsets were
            # taken so that they copy none of its rows (the rule kernels read the whole step's)
            if self.skip_nonfinite:
                _ = batch.local_grad_sq
            self._whole_step = batch
        try:
            for gi, sub in subsets.items():
                # 0-d views into the per-group vectors: the method's in-place writes land in group gi's slot
                self._scalar_view = {**store, **{name: store[name][gi] for name in per_group},
                                     "steps": store["group_steps"][gi]}
                self._current_group = gi
                self._update_d(sub)
        finally:
            self._scalar_view, self._current_group, self._whole_step = None, None, None
        if batch.rule_kernel:  # counted by the rule kernels: "steps" and "skipped" by the first group's
            return
        # the optimizer-wide count: steps taken by any group (each group counts its own in "group_steps")
        store["steps"].add_(batch.ok.to(torch.float64))

    # -- shared pieces of the members' rules --------------------------------------------------------
    def _adam_step_size(self, lr: float) -> torch.Tensor:
        """:func:`adam_step_size` on the store's d and step count; betas and the flag from the rule group."""
        hp = self.rule_group()
        return adam_step_size(self.S["d"], lr, self.S["steps"], *hp["betas"], hp["use_bias_correction"])

    def _shared_lr(self) -> float:
        """γ: the group's own lr with per-group d; else the largest group lr (see the module docstring
        for how the other groups' lrs act)."""
        if self.per_group_d:
            return self.rule_group()["lr"]
        return max(group["lr"] for group in self.param_groups)

    def _lr_ratios(self, batch: StepBatch) -> list[float]:
        """c_t = lr/γ of every tensor of ``batch`` (host floats: lrs live on the host); 0 for lr = 0, and
        exactly 1.0 for a group whose lr equals γ, so equal lrs reproduce the references bit for bit."""
        gamma = self._shared_lr()
        return [it.group["lr"] / gamma if gamma > 0 else 0.0 for it in batch.items]

    def _first_rise_d0(self) -> float:
        """The d0 Prodigy compares d with to detect its first rise: the last group's, a quirk of the
        reference's loop variable (ALGORITHMS §4.7); the group's own with per-group d."""
        return self.rule_group()["d0"] if self.per_group_d else self.param_groups[-1]["d0"]
