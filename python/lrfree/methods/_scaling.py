"""Parameter scaling: the identity behind PS-SPS and PS-DA-SGD (Suh & Seo, arXiv 2401.03240).

With a per-element scale α > 0 held fixed during a step, scaled parameters u = α ⊙ x see the gradient
g/α, and an SGD step of size η in u maps back to x ← x − η g/α². So Adam's update is steepest descent
on a parameter-scaled network, and a learning-rate-free rule for SGD can be run in the scaled space:
its norms become α-weighted (‖g/α‖², ‖α ⊙ s‖) and its step is applied along g/α² (ALGORITHMS §2.1).

This module holds the Adam scaling rule that both methods share::

    v_t = β2 v_{t−1} + (1 − β2) g_t²,   v̂_t = v_t / (1 − β2^t)   (AMSGrad: the running max of v̂_t)
    α_t² = √v̂_t + ε

and the direction u_t = m̂_t / α_t² (β1 > 0, m̂ the bias-corrected gradient EMA) or g_t / α_t² (β1 = 0),
plus decoupled weight decay λ x_t. With ``scaling="none"`` α ≡ 1 (the base SGD method, for testing).
"""

from __future__ import annotations

import torch

from ..backends import torch_ref as R
from ..scalar_math import M


def scale_coefficients_rule(t, h):
    """The step's scaling coefficients (``lrfree.scalar_math`` style: the torch call and the fused one run
    this function), from t = steps + 1 and h = (β1, β2, ε): bias corrections and the 1 − β complements
    formed in fp64, in the layout ``lrfree.kernels.scaling`` reads:
    [β1, 1−β1, 1−β1^t, β2, 1−β2, 1−β2^t, 1−β2^(t−1) (1 at t = 1), ε]."""
    beta1, beta2, eps = M.at(h, 0), M.at(h, 1), M.at(h, 2)
    bc_prev = 1 - M.pow(beta2, t - 1)
    return (beta1, 1 - beta1, 1 - M.pow(beta1, t), beta2, 1 - beta2, 1 - M.pow(beta2, t),
            M.where(bc_prev > 0, bc_prev, 1.0), eps)


def scale_hyperparameters(hp: dict) -> tuple[float, float, float]:
    """h of :func:`scale_coefficients_rule`: (β1, β2, ε) of the rule group ``hp``."""
    beta1, beta2 = hp["betas"]
    return float(beta1), float(beta2), float(hp["eps"])


def scale_coefficients(batch, hp: dict, steps: torch.Tensor, known: torch.Tensor | None = None):
    """The step's scaling coefficients (:func:`scale_coefficients_rule`, t = ``steps`` + 1, the rule's 0-d
    step counter) as one fp64 device vector. On a fused backend one launch forms it
    (``lrfree.kernels.scaling.coefficients``), and also, given a 0-d fp64 ``known``, the int32 flag
    ``known > 0`` a pass needed only until a statistic is known reads (then a pair is returned)."""
    h = batch.vector(scale_hyperparameters(hp))
    if batch.fused:
        from ..kernels import scaling
        return scaling.coefficients(batch, steps, h, known)
    coefficients = torch.stack(scale_coefficients_rule(steps + 1, h))
    return coefficients if known is None else (coefficients, known > 0)


def init_scaling_state(opt, p, group, hp: dict | None = None) -> dict[str, torch.Tensor]:
    """The scaling rule's state of ``p``; ``hp`` the hyperparameters it steps with (default: the rule
    group's)."""
    hp = opt.rule_group(group) if hp is None else hp
    state = {}
    if hp["scaling"] == "adam":
        state["exp_avg_sq"] = opt.zeros_state(p)
        if hp["amsgrad"]:
            state["max_exp_avg_sq"] = opt.zeros_state(p)
    if hp["betas"][0] > 0:
        state["exp_avg"] = opt.zeros_state(p)
    return state


class ScaledStep:
    """The per-tensor quantities of one step under the Adam scaling rule (torch reference).

    ``alpha_sq`` is α_t² (new, including g_t); ``alpha_sq_prev`` is α_{t−1}² from the stored v (only
    meaningful from the second step on); ``direction`` is u_t without weight decay. New moment values
    are committed with :meth:`commit`.
    """

    def __init__(self, hp: dict, state: dict, g: torch.Tensor, t: torch.Tensor):
        beta1, beta2 = hp["betas"]
        self.state, self.hp = state, hp
        self.new = {}
        if hp["scaling"] == "adam":
            eps = hp["eps"]
            v = state["exp_avg_sq"]
            v_new = R.addcmul(v * beta2, g, g, 1 - beta2)
            self.new["exp_avg_sq"] = v_new
            bc_new, bc_prev = 1 - beta2 ** t, 1 - beta2 ** (t - 1)
            if hp["amsgrad"]:
                # the running max of the *bias-corrected* v̂, so α never decreases (the setting of the
                # paper's convergence proof) and the max-scale-ratio is exactly 1
                v_hat_prev = state["max_exp_avg_sq"]
                v_hat = torch.maximum(v_hat_prev, v_new / bc_new)
                self.new["max_exp_avg_sq"] = v_hat
                self.alpha_sq = v_hat.sqrt() + eps
                self.alpha_sq_prev = v_hat_prev.sqrt() + eps
            else:
                self.alpha_sq = v_new.sqrt() / bc_new.sqrt() + eps
                safe_bc_prev = torch.where(bc_prev > 0, bc_prev, torch.ones_like(bc_prev))
                self.alpha_sq_prev = v.sqrt() / safe_bc_prev.sqrt() + eps
        else:
            self.alpha_sq = self.alpha_sq_prev = torch.ones_like(g)
        if beta1 > 0:
            m_new = torch.lerp(state["exp_avg"], g, 1 - beta1)
            self.new["exp_avg"] = m_new
            self.direction = (m_new / (1 - beta1 ** t)) / self.alpha_sq
        else:
            self.direction = g / self.alpha_sq

    def max_scale_ratio(self, t: torch.Tensor) -> torch.Tensor:
        """max_j α_{t−1,j} / α_{t,j} (1 at the first step, where α_{t−1} is undefined)."""
        ratios = (self.alpha_sq_prev / self.alpha_sq).reshape(-1)
        ratio = torch.cat([ratios, ratios.new_ones(1)]).max().sqrt().to(torch.float64)  # 1 for an empty tensor
        return torch.where(t > 1, ratio, torch.ones_like(ratio))

    def commit(self, ok: torch.Tensor) -> None:
        for key, value in self.new.items():
            R.commit_(self.state[key], value, ok)
