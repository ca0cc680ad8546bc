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

import functools

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


class _Corrections:
    """The step's bias corrections, formed once per step and shared by every chunk's :class:`ScaledStep`
    (per chunk and pass they were a dozen 0-d ops: ~0.1 ms of PS-DA-SGD's CPU step on GPT-2's layout)."""

    def __init__(self, hp: dict, steps: torch.Tensor):
        beta1, beta2 = hp["betas"]
        t = steps + 1
        self.bias1 = 1 - beta1 ** t  # 1 − β1^t
        self.bias2 = 1 - beta2 ** t  # 1 − β2^t
        self.bias2_sqrt = self.bias2.sqrt()
        bias2_prev = 1 - beta2 ** (t - 1)  # 0 at t = 1, where α_{t−1} is not used
        self.bias2_prev_sqrt = torch.where(bias2_prev > 0, bias2_prev, torch.ones_like(bias2_prev)).sqrt()
        self.later = t > 1  # α_{t−1} exists

    @classmethod
    def of(cls, batch, hp: dict, steps: torch.Tensor) -> "_Corrections":
        """The corrections at t = ``steps`` + 1 (``steps``: the rule's 0-d step counter, which a step
        advances only after its passes), once per batch, betas and counter."""
        kept = batch.__dict__.setdefault("_scale_corrections", {})
        key = (tuple(hp["betas"]), id(steps))
        hit = kept.get(key)
        if hit is None or hit[0] is not steps:
            hit = kept[key] = (steps, cls(hp, steps))
        return hit[1]


class ScaledStep:
    """The per-tensor quantities of one step under the Adam scaling rule (torch reference), for the
    tensors of one chunk (``lrfree.backends.torch_ref.Chunk``).

    ``alpha_sq`` is α_t² (new, including g_t); ``direction`` (formed on first use) is u_t without weight
    decay; with ``scale_ratio``, ``scale_ratio`` is each tensor's max_j α_{t−1,j} / α_{t,j}
    (:meth:`max_scale_ratio`). New moment values are committed with :meth:`commit`. A pass forms the
    scaled step of one chunk at a time (the stats and apply passes form it again): keeping every chunk's
    for the next pass would hold parameter-sized buffers per step, and measured on GPT-2's layout on a
    CPU it was no faster. Chains of ops on fresh results run in place: the same values, without a new
    buffer per op.
    """

    def __init__(self, hp: dict, chunk: R.Chunk, g: torch.Tensor, steps: torch.Tensor, scale_ratio: bool = False):
        """``steps``: the rule's 0-d step counter (this step is t = ``steps`` + 1)."""
        beta2 = hp["betas"][1]
        self.chunk, self.hp, self.g = chunk, hp, g
        self.corrections = k = _Corrections.of(chunk.batch, hp, steps)
        self.new = {}
        alpha_sq_prev = None  # α_{t−1}² from the stored v (only meaningful from the second step on)
        if hp["scaling"] == "adam":
            eps = hp["eps"]
            v = chunk.state("exp_avg_sq")
            v_new = (v * beta2).addcmul_(g, g, value=1 - beta2)
            self.new["exp_avg_sq"] = v_new
            if hp["amsgrad"]:
                # the running max of the *bias-corrected* v̂, so α never decreases (the setting of the
                # paper's convergence proof) and the max-scale-ratio is exactly 1
                v_hat_prev = chunk.state("max_exp_avg_sq")
                v_hat = v_new / k.bias2
                torch.maximum(v_hat_prev, v_hat, out=v_hat)
                self.new["max_exp_avg_sq"] = v_hat
                self.alpha_sq = v_hat.sqrt().add_(eps)
                if scale_ratio:
                    alpha_sq_prev = v_hat_prev.sqrt().add_(eps)
            else:
                self.alpha_sq = v_new.sqrt().div_(k.bias2_sqrt).add_(eps)
                if scale_ratio:
                    alpha_sq_prev = v.sqrt().div_(k.bias2_prev_sqrt).add_(eps)
        else:
            self.alpha_sq = torch.ones_like(g)
        if scale_ratio:
            self.scale_ratio = self.max_scale_ratio(self.alpha_sq if alpha_sq_prev is None else alpha_sq_prev)

    @functools.cached_property
    def direction(self) -> torch.Tensor:
        beta1 = self.hp["betas"][0]
        if beta1 > 0:
            m_new = torch.lerp(self.chunk.state("exp_avg"), self.g, 1 - beta1)
            self.new["exp_avg"] = m_new
            return (m_new / self.corrections.bias1).div_(self.alpha_sq)
        return self.g / self.alpha_sq

    def max_scale_ratio(self, alpha_sq_prev: torch.Tensor) -> torch.Tensor:
        """max_j α_{t−1,j} / α_{t,j} of each tensor (1 at the first step, where α_{t−1} is undefined, and for a
        tensor without elements): fp64, one per tensor of the chunk."""
        ratios = alpha_sq_prev / self.alpha_sq
        ratio = self.chunk.amax(ratios).clamp_min(1.0).sqrt().to(torch.float64)  # max(ratios ∪ {1})
        return torch.where(self.corrections.later, ratio, 1.0)

    def commit(self, ok: torch.Tensor) -> None:
        self.direction  # m's new value is formed with the direction
        for key, value in self.new.items():
            self.chunk.commit_state(key, value, ok)
