"""Clipped SGD: gradient descent with global-norm clipping (the baseline of Takezawa et al., eq. 4).

    κ_t = min{1, max_norm / (‖g_t‖ + eps)},   d_t = κ_t g_t + λ x_t
    b_t = μ b_{t−1} + d_t   (heavy ball; with ``nesterov``: d_t + μ b_t),   x_{t+1} = x_t − lr · b_t

The norm is global over every parameter of the optimizer, exactly as
``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by ``torch.optim.SGD`` (with which it
agrees to rounding; ``eps`` = 1e-6 is the same guard torch uses). With ``momentum=0`` and ``eps=0``
it is the paper's clipped GD. Unlike the other methods it needs a tuned ``lr`` and ``max_norm``.

Every hyperparameter is per group, ``max_norm`` and ``eps`` included: group g is clipped with
κ_g = min{1, max_norm_g / (‖g_t‖ + eps_g)}, its own threshold against the one *global* norm. Why the global
norm and not the group's own: clipping measures how steep the whole objective is (the (L0, L1)-smoothness
the method is built on is a property of ‖∇f‖, ALGORITHMS §1.1), and per-group norms would make the
trajectory depend on how the parameters happen to be grouped and turn the clipped step into a different
direction even with equal thresholds. With the global norm, equal thresholds are exactly
``clip_grad_norm_`` over every parameter, splitting a group in two with the same settings changes
nothing, and a per-group threshold is a per-group cap on the step: a group with a larger max_norm is
clipped later (max_norm = inf: never). ``scalars()["clip_coef"]`` has one entry per group.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch
from ..scalar_math import M


def clip_rule(norm, max_norm, eps):
    """κ = min(1, max_norm / (‖g‖ + eps)) (``lrfree.scalar_math`` style: the torch backends call it on
    device values, a fused backend inside the rule kernel)."""
    return M.minimum(max_norm / (norm + eps), 1.0)


class ClippedSGD(FusedOptimizer):
    """SGD with global gradient-norm clipping, momentum and (coupled) weight decay.

    Args:
        params: parameters or param groups.
        lr: learning rate η.
        max_norm: clipping threshold c on the global gradient norm (per group: the group's own threshold
            on the global norm).
        momentum: heavy-ball momentum μ (as ``torch.optim.SGD``, no dampening).
        weight_decay: L2 penalty λ added to the clipped gradient.
        nesterov: Nesterov momentum.
        eps: added to the norm in the clipping coefficient.
    """

    hyperparameters = {"lr": V.NONNEG, "max_norm": V.POSITIVE_OR_INF, "momentum": V.UNIT_INTERVAL,
                       "weight_decay": V.NONNEG, "nesterov": V.BOOL, "eps": V.NONNEG}
    recomputed_scalars = frozenset({"clip_coef", "grad_norm"})
    kernels = "clipped_sgd"
    low_precision_state = ("momentum_buffer",)
    fused_rule = True

    def __init__(self, params, lr: float, max_norm: float, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, eps: float = 1e-6, backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        if nesterov and momentum <= 0:
            raise ValueError("ClippedSGD: nesterov=True requires momentum > 0")
        super().__init__(params, dict(lr=lr, max_norm=max_norm, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, eps=eps), backend=backend, skip_nonfinite=skip_nonfinite,
                                      master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                                      state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)} if group["momentum"] > 0 else {}

    def initial_scalars(self):
        return {"grad_norm": 0.0}

    def initial_group_scalars(self, group):
        return {"clip_coef": 1.0}

    def _rule(self, grad_sq: torch.Tensor) -> dict[str, torch.Tensor]:
        """κ_g = min(1, max_norm_g / (‖g‖ + eps_g)) for every group, from the global Σg² (device tensors
        only; the thresholds are host floats)."""
        norm = M.sqrt(grad_sq)
        max_norm, eps = self._clip_vectors()
        return {"clip_coef": clip_rule(norm, max_norm, eps), "grad_norm": norm}

    def _clip_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every group's max_norm and eps, as device vectors."""
        groups = self.param_groups
        return (self._coefficient_vector(tuple(float(g["max_norm"]) for g in groups)),
                self._coefficient_vector(tuple(float(g["eps"]) for g in groups)))

    def _update(self, batch: StepBatch) -> None:
        if batch.rule_kernel:  # one launch: the accept decision, ‖g‖, every κ (store and per tensor), counters
            self._pass("clipped_apply")(batch, self._pass("clip_rule")(batch))
            return
        new = self._rule(batch.reduce(batch.grad_sq))
        # every tensor's κ: its group's
        clip = new["clip_coef"].index_select(0, batch.index(it.group_index for it in batch.items))
        self._pass("clipped_apply")(batch, clip)
        self._set_all(new, batch.ok)
        self.S["steps"].add_(batch.ok.to(torch.float64))

    def _ref_clipped_apply(self, batch: StepBatch, clip: torch.Tensor) -> None:
        """``clip``: every tensor's κ (fp64, one per item)."""
        for c in R.chunks(batch):
            group = c.group
            x = c.params
            d = c.grads * c.per_tensor(clip)
            if group["weight_decay"] != 0:
                d = R.axpy(d, x, group["weight_decay"])
            if group["momentum"] > 0:
                new_buf = group["momentum"] * c.state("momentum_buffer") + d
                c.commit_state("momentum_buffer", new_buf, batch.ok)
                d = R.axpy(d, new_buf, group["momentum"]) if group["nesterov"] else new_buf
            c.commit_params(R.axpy(x, d, -group["lr"]), batch.ok)
