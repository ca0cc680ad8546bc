"""PS-SPS: the stochastic Polyak step size on the Adam-scaled network (Suh & Seo, Algorithm 1).

SPS computed in the scaled space, where the gradient is g/α (ALGORITHMS §2.2; reconstruction)::

    α_t² = √v̂_t + ε                          (Adam scaling rule; AMSGrad option)
    η_t  = (f_t − f*)₊ / (c ‖g_t / α_t‖²)     = (f_t − f*)₊ / (c Σ_j g_j² / α_j²)
    x    ← x − lr · η_t · (u_t + λ x)          u_t = g_t/α_t² (β1 = 0, the paper's PS-SPS) or m̂_t/α_t²

With ``scaling="none"`` and β1 = 0 it is exactly SPS in ``"constant"`` mode with the same c (and ε = 0).

Safeguard. When f* is not attained (language models: the loss stays near the data's entropy while
‖g/α‖ shrinks) the uncapped Polyak step grows without bound and training diverges, as plain SPS does.
The library keeps the paper's rule and bounds it with SPS's own "smooth" growth cap, made relative::

    η_t ≤ gamma^(1/n_batches_per_epoch) · η_{t−1}      (η_{−1} = the first Polyak step)

i.e. the step may grow by at most a factor ``gamma`` per ``n_batches_per_epoch`` steps (defaults 2 and
500, the reference SPS values) but may shrink at once. Starting from the first Polyak step rather than
a fixed ``init_step_size`` keeps the rule free of a learning rate and invariant to rescaling the loss.
``smooth=False`` gives the uncapped rule (optionally with ``eta_max``).
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch
from ..scalar_math import M
from ._scaling import ScaledStep, init_scaling_state, scale_coefficients


def pssps_rule(loss, scaled_sq, smooth_ref, h, SMOOTH, CAPPED):
    """PS-SPS's rule (``lrfree.scalar_math`` style): (η, the new growth reference, ‖g/α‖) from the loss,
    ‖g/α‖² and the growth reference; h = (c, f*, growth per step gamma^(1/n_batches_per_epoch), eta_max),
    ``SMOOTH``: the growth cap, ``CAPPED``: eta_max is set.

    η = (f − f*)₊ / (c ‖g/α‖²) (0 for a zero gradient), growth-capped and at most eta_max."""
    c, f_star, growth, eta_max = M.at(h, 0), M.at(h, 1), M.at(h, 2), M.at(h, 3)
    eta = M.safe_div(M.maximum(loss - f_star, 0.0), c * scaled_sq, 0.0)
    if SMOOTH:
        eta = M.minimum(eta, growth * smooth_ref)
    if CAPPED:
        eta = M.minimum(eta, eta_max)
    # a zero gradient takes no step and does not reset the growth reference
    return eta, M.where(scaled_sq > 0, eta, smooth_ref), M.sqrt(scaled_sq)


class PSSPS(FusedOptimizer):
    """Parameter-scaled SPS: Adam's direction with a stochastic Polyak step size; no learning rate.

    Args:
        params: parameters or param groups.
        c: the Polyak constant (0.5, as the paper uses for SPS).
        f_star: the optimal (lower-bound) loss value f*.
        betas: (β1, β2): β1 is the momentum of the direction (0: the paper's plain scaled gradient);
            β2 the decay of the second moment that defines the scale α.
        eps: ε in α² = √v̂ + ε.
        amsgrad: AMSGrad scaling (α never decreases).
        lr: multiplier on the step size (default 1).
        weight_decay: decoupled weight decay (per group).
        smooth: bound the step's growth (see module docstring); ``gamma``, ``n_batches_per_epoch``.
        eta_max: optional absolute cap on η_t.
        scaling: ``"adam"`` (default) or ``"none"`` (α ≡ 1, i.e. SPS; for testing).
    """

    requires_loss = True
    hyperparameters = {"c": V.POSITIVE, "f_star": V.ANY_REAL, "betas": V.betas(), "eps": V.POSITIVE,
                       "amsgrad": V.BOOL, "lr": V.NONNEG, "weight_decay": V.NONNEG, "smooth": V.BOOL,
                       "gamma": V.real(1.0, allow_inf=True), "n_batches_per_epoch": V.integer(1),
                       "eta_max": V.optional(V.POSITIVE_OR_INF), "scaling": V.choice("adam", "none")}
    shared_hyperparameters = ("c", "f_star", "betas", "eps", "amsgrad", "smooth", "gamma", "n_batches_per_epoch",
                              "eta_max", "scaling")
    kernels = "ps_sps"
    low_precision_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    fused_rule = True

    def __init__(self, params, c: float = 0.5, f_star: float = 0.0, betas=(0.0, 0.999), eps: float = 1e-8,
                 amsgrad: bool = False, *, lr: float = 1.0, weight_decay: float = 0.0, smooth: bool = True,
                 gamma: float = 2.0, n_batches_per_epoch: int = 500, eta_max: float | None = None,
                 scaling: str = "adam", backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        defaults = dict(c=c, f_star=f_star, betas=V.as_tuple(betas), eps=eps, amsgrad=amsgrad, lr=lr,
                        weight_decay=weight_decay, smooth=smooth, gamma=gamma,
                        n_batches_per_epoch=n_batches_per_epoch, eta_max=eta_max, scaling=scaling)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def init_state(self, p, group):
        return init_scaling_state(self, p, group)

    def initial_scalars(self):
        return {"step_size": 0.0, "smooth_ref": math.inf, "scaled_grad_norm": 0.0}

    def _rule_hyperparameters(self) -> tuple[tuple[float, ...], bool, bool]:
        """(h, SMOOTH, CAPPED) of :func:`pssps_rule`, from group 0."""
        hp = self.param_groups[0]
        capped = hp["eta_max"] is not None
        h = (float(hp["c"]), float(hp["f_star"]), float(hp["gamma"]) ** (1.0 / hp["n_batches_per_epoch"]),
             float(hp["eta_max"]) if capped else math.inf)
        return h, bool(hp["smooth"]), capped

    def _stats(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(coefficients, ‖g/α‖² per tensor over this rank's elements): the stats pass, once per step (α
        from this step's v, nothing written)."""
        if not hasattr(batch, "_pssps_stats"):
            coefficients = scale_coefficients(batch, self.param_groups[0], self.S["steps"])
            batch._pssps_stats = (coefficients, self._pass("pssps_stats")(batch, coefficients)[:, 0])
        return batch._pssps_stats

    def _local_scaled_sq(self, batch: StepBatch) -> torch.Tensor:
        """‖g/α‖² over this rank's elements (0-d), reduced once per step."""
        if not hasattr(batch, "_pssps_scaled_sq"):
            batch._pssps_scaled_sq = batch.reduce(self._stats(batch)[1])
        return batch._pssps_scaled_sq

    def _finite_witness(self, batch: StepBatch) -> torch.Tensor:
        # ‖g/α‖² is non-finite whenever a gradient element is (or its square overflows the state's
        # precision, a step no Adam-style rule could take), so the stats pass doubles as the guard
        return self._local_scaled_sq(batch)

    def _update(self, batch: StepBatch) -> None:
        coefficients, per_tensor = self._stats(batch)
        if batch.rule_kernel:  # one launch: the accept decision (‖g/α‖² is the witness), η, the store, counters
            coef = self._pass("pssps_rule")(batch, per_tensor)
            self._pass("pssps_apply")(batch, coefficients, coef)
            return
        scaled_sq, = batch.sync(self._local_scaled_sq(batch))  # the step's one collective when sharded
        S, ok = self.S, batch.ok
        h, smooth, capped = self._rule_hyperparameters()
        eta, ref, norm = pssps_rule(batch.loss, scaled_sq, S["smooth_ref"], batch.vector(h), smooth, capped)
        # apply pass: v, m and x updated
        self._pass("pssps_apply")(batch, coefficients, eta * batch.per_item("lr"))
        self._set_all(dict(step_size=eta, smooth_ref=ref, scaled_grad_norm=norm), ok)
        S["steps"].add_(ok.to(torch.float64))

    # -- torch reference passes --------------------------------------------------------------------
    def _scaled_step(self, c: R.Chunk) -> ScaledStep:
        return ScaledStep(self.param_groups[0], c, c.grads, self.S["steps"])

    def _ref_pssps_stats(self, batch: StepBatch, coefficients) -> torch.Tensor:
        return R.per_item(batch, lambda c: c.sum(c.grads ** 2 / self._scaled_step(c).alpha_sq).unsqueeze(1))

    def _ref_pssps_apply(self, batch: StepBatch, coefficients, coef: torch.Tensor) -> None:
        for c in R.chunks(batch):
            st = self._scaled_step(c)
            x = c.params
            u = st.direction
            if c.group["weight_decay"] != 0:
                u = R.axpy(u, x, c.group["weight_decay"])
            st.commit(batch.ok)
            c.commit_params(R.axpy(x, u, -c.per_tensor(coef)), batch.ok)
