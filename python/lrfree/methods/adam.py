"""Adam and AdamW with ``torch.optim`` semantics: the fixed-learning-rate baseline of every benchmark.

Per tensor, at its own step count t (a tensor counts only the steps in which it had a gradient)::

    g ← −g (maximize);   g ← g + wd·x (Adam)  |  x ← x (1 − lr·wd) (AdamW)
    m ← β1 m + (1−β1) g;   v ← β2 v + (1−β2) g²;   v̂max ← max(v̂max, v) (amsgrad)
    x ← x − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + eps)

Matches ``torch.optim.Adam``/``AdamW`` to rounding; the difference is that state is fp32 for bf16/fp16
parameters and the step count lives on device, so skipped steps do not advance it.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch
from ..scalar_math import M


def adam_bias_rule(t, lr, beta1, beta2):
    """The bias-corrected step size lr / (1 − β1^t) and √(1 − β2^t) at step count t (``lrfree.scalar_math``
    style: the torch backends call it on device values, a fused backend inside the rule kernel)."""
    return lr / (1.0 - M.pow(beta1, t)), M.sqrt(1.0 - M.pow(beta2, t))


def new_moments(chunk: R.Chunk, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²  (v̂max ← max(v̂max, v) with amsgrad), formed but not stored:
    (m, the v the step divides by, the new state values by key). The reference of Adam's moments, shared
    with GLyDER's Adam direction."""
    group = chunk.group
    beta1, beta2 = group["betas"]
    m = torch.lerp(chunk.state("exp_avg"), g, 1 - beta1)
    v = R.addcmul(chunk.state("exp_avg_sq") * beta2, g, g, 1 - beta2)
    new = {"exp_avg": m, "exp_avg_sq": v}
    if group["amsgrad"]:
        v = new["max_exp_avg_sq"] = torch.maximum(chunk.state("max_exp_avg_sq"), v)
    return m, v, new


def commit_moments_(chunk: R.Chunk, new: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
    """Store :func:`new_moments`' values, only if the step is accepted."""
    for key, value in new.items():
        chunk.commit_state(key, value, ok)


def update_moments_(chunk: R.Chunk, g: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`new_moments`, committed only if the step is accepted; returns (m, the v the step divides by)."""
    m, v, new = new_moments(chunk, g)
    commit_moments_(chunk, new, ok)
    return m, v


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba, 2015) with coupled L2 weight decay, as ``torch.optim.Adam``."""

    hyperparameters = {"lr": V.NONNEG, "betas": V.betas(), "eps": V.NONNEG, "weight_decay": V.NONNEG,
                       "amsgrad": V.BOOL, "maximize": V.BOOL}
    kernels = "adam"
    low_precision_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    decoupled = False
    fused_rule = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False, *, maximize: bool = False, backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        defaults = dict(lr=lr, betas=V.as_tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def _validate_hyperparameters(self, owner, index, group, first):
        super()._validate_hyperparameters(owner, index, group, first)
        # torch.optim.Adam(decoupled_weight_decay=True) is AdamW: a group asking for the other weight decay
        # (a torch state dict loaded into the wrong class) would silently be stepped with this class's
        decoupled = group.get("decoupled_weight_decay", self.decoupled)
        if decoupled != self.decoupled:
            raise ValueError(f"{owner} param_groups[{index}]: decoupled_weight_decay={decoupled!r}, but "
                             f"{type(self).__name__} {'decouples' if self.decoupled else 'couples'} weight decay; "
                             f"use lrfree.{'AdamW' if decoupled else 'Adam'}")

    def init_state(self, p, group):
        state = {"exp_avg": self.zeros_state(p), "exp_avg_sq": self.zeros_state(p)}
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = self.zeros_state(p)
        return state

    def initial_tensor_scalars(self, group, p):
        return {"step": 0.0}

    def _update(self, batch: StepBatch) -> None:
        if batch.rule_kernel:  # the step counts, bias corrections, accept flag and counters in one launch
            self._pass("adam_step")(batch)
            return
        index = batch.index(it.flat_index for it in batch.items)
        step = self.S["step"].index_select(0, index) + 1  # each tensor counts the steps it took part in
        self._pass("adam_step")(batch, step)
        self._set_at("step", index, step, batch.ok)
        self.S["steps"].add_(batch.ok.to(torch.float64))

    def _ref_adam_step(self, batch: StepBatch, step: torch.Tensor) -> None:
        """``step``: every tensor's own step count t (fp64, one per item)."""
        ok = batch.ok
        for c in R.chunks(batch):
            group = c.group
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            x, g = c.params, c.grads
            if group["maximize"]:
                g = -g
            if wd != 0:
                if self.decoupled:
                    x = x * (1 - lr * wd)
                else:
                    g = R.axpy(g, x, wd)
            m, v = update_moments_(c, g, ok)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
            denom = v.sqrt() / c.per_tensor(bias_correction2_sqrt) + eps
            c.commit_params(R.addcdiv(x, m, denom, -c.per_tensor(lr / bias_correction1)), ok)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter, 2019): Adam with decoupled weight decay, as ``torch.optim.AdamW``."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, backend=backend,
                         skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)
