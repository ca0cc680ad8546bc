"""Clipped SGD: gradient descent with global-norm clipping (the baseline of Takezawa et al., eq. 4).

    κ_t = min{1, max_norm / (‖g_t‖ + eps)},   d_t = κ_t g_t + λ x_t
    b_t = μ b_{t−1} + d_t   (heavy ball; with ``nesterov``: d_t + μ b_t),   x_{t+1} = x_t − lr · b_t

The norm is global over every parameter of the optimizer, exactly as
``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by ``torch.optim.SGD`` (with which it
agrees to rounding; ``eps`` = 1e-6 is the same guard torch uses). With ``momentum=0`` and ``eps=0``
it is the paper's clipped GD. Unlike the other methods it needs a tuned ``lr`` and ``max_norm``.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch


class ClippedSGD(FusedOptimizer):
    """SGD with global gradient-norm clipping, momentum and (coupled) weight decay.

    Args:
        params: parameters or param groups.
        lr: learning rate η.
        max_norm: clipping threshold c on the global gradient norm.
        momentum: heavy-ball momentum μ (as ``torch.optim.SGD``, no dampening).
        weight_decay: L2 penalty λ added to the clipped gradient.
        nesterov: Nesterov momentum.
        eps: added to the norm in the clipping coefficient.
    """

    hyperparameters = {"lr": V.NONNEG, "max_norm": V.POSITIVE_OR_INF, "momentum": V.UNIT_INTERVAL,
                       "weight_decay": V.NONNEG, "nesterov": V.BOOL, "eps": V.NONNEG}
    shared_hyperparameters = ("max_norm", "eps")
    recomputed_scalars = frozenset({"clip_coef", "grad_norm"})
    kernels = "clipped_sgd"

    def __init__(self, params, lr: float, max_norm: float, *, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, eps: float = 1e-6, backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False,
                 stochastic_rounding: bool = False, process_group=None,
                 sharded: bool | None = None):
        if nesterov and momentum <= 0:
            raise ValueError("ClippedSGD: nesterov=True requires momentum > 0")
        super().__init__(params, dict(lr=lr, max_norm=max_norm, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, eps=eps), backend=backend, skip_nonfinite=skip_nonfinite,
                                      master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         process_group=process_group, sharded=sharded)

    def init_state(self, p, group):
        return {"momentum_buffer": self.zeros_state(p)} if group["momentum"] > 0 else {}

    def initial_scalars(self):
        return {"clip_coef": 1.0, "grad_norm": 0.0}

    def _rule(self, grad_sq: torch.Tensor) -> dict[str, torch.Tensor]:
        """κ = min(1, max_norm / (‖g‖ + eps)) from the global Σg² (0-d tensors only)."""
        hp = self.param_groups[0]
        norm = grad_sq.sqrt()
        return {"clip_coef": (hp["max_norm"] / (norm + hp["eps"])).clamp_max(1.0), "grad_norm": norm}

    def _update(self, batch: StepBatch) -> None:
        new = self._rule(batch.reduce(batch.grad_sq))
        self._pass("clipped_apply")(batch, new["clip_coef"])
        for name, value in new.items():
            self._set(name, value, batch.ok)
        self.S["steps"].add_(batch.ok.to(torch.float64))

    def _ref_clipped_apply(self, batch: StepBatch, clip: torch.Tensor) -> None:
        for it in batch.items:
            group = it.group
            x = R.up(it.p, it.p)
            d = R.up(it.g, it.p) * clip
            if group["weight_decay"] != 0:
                d = R.axpy(d, x, group["weight_decay"])
            if group["momentum"] > 0:
                buf = it.state["momentum_buffer"]
                new_buf = group["momentum"] * buf + d
                R.commit_(buf, new_buf, batch.ok)
                d = R.axpy(d, new_buf, group["momentum"]) if group["nesterov"] else new_buf
            R.commit_(it.p, batch.rounded(it, R.axpy(x, d, -group["lr"])), batch.ok)
