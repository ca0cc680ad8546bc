"""PS-DA-SGD: D-Adapt SGD on the Adam-scaled network (Suh & Seo, arXiv 2401.03240, Algorithm 2).

The paper's Algorithm 2 lost its symbols in our copy; this is the reconstruction of ALGORITHMS §2.3,
pinned down by the paper's stated properties (see README, "PS-DA-SGD and PS-SPS: what we chose").
Accumulators live in original coordinates so that only the norms see α (``_scaling``)::

    α_t² = √v̂_t + ε                                   (Adam scaling rule; AMSGrad option)
    n_0  = ‖g_0 / α_0‖,   d starts at d0 · rms(α_0)    (d0 is a distance in original coordinates)
    λ_t  = d_t γ_t / n_0
    ρ_t  = max(1, max_j α_{t−1,j} / α_{t,j})          (max-scale-ratio; ≡ 1 under AMSGrad)
    N   ← N / ρ_t + λ_t ⟨g_t, s_t⟩                    (⟨g/α, α s⟩ = ⟨g, s⟩: scale-free)
    s   ← s + λ_t u_t,     u_t = m̂_t/α_t² (or g_t/α_t² with β1 = 0) + λ_wd x_t
    d_{t+1} = max(d_t, min(2N / ‖α_t ⊙ s‖, d_t · growth_rate))
    x   ← x − λ_t u_t                 (momentum = 0)
    x   ← μ x + (1 − μ)(x_0 − s)      (momentum = μ > 0: D-Adapt SGD's primal averaging)

Properties this reconstruction has, each tested: with ``scaling="none"`` and β1 = 0 it is exactly
``DAdaptSGD(momentum=μ)``; with the step frozen and μ = 0 it is exactly Adam; multiplying the loss by
any constant leaves the trajectory unchanged up to ε (that is why d starts at d0·rms(α_0): the paper's
first insight, that multiplying all α by one constant must not change the update); d never decreases,
so a tensor whose gradient vanishes early cannot stop the others (the paper's second insight).

Group lrs may differ: γ_t is the largest and a group with lr = c·γ_t is PS-DA-SGD on the network
reparametrized by x = c·u (methods/_dadapt.py): its step (weight decay included) is c λ_t u, s is kept as
the displacement of x so the numerator does not change, n_0² = Σ c ‖g/α‖², rms(α_0)² = Σ c α²/n and
‖α ⊙ s‖² = Σ ‖α ⊙ s‖²/c; equal lrs are the plain rule. A group with lr = 0 is not touched.

"A momentum of 0.9" is read as Adam's β1 = 0.9 (the default), with no primal averaging: measured on
a char-level transformer, the EMA reading trains much better than averaging (README has the numbers).
``momentum`` is D-Adapt SGD's primal averaging and needs β1 = 0: the two together stacked to chance
accuracy on a digits MLP, so they are refused with a message saying what to pass.

The defaults (d0 = 1e-6, uncapped growth) were measured against safeguards (docs/RESULTS.md, "PS-DA-SGD's
defaults"): d grows geometrically for ~30 steps, then d̂ turns negative (the iterate went past what the
history points to) and d stays at the peak, which is the largest step that still made progress. On the
char-GPT that step (8e-3) is where Adam's best lr is (1e-2); on the digits it is 1.5e-2 where Adam's best
held-out loss is at 3e-4, so the predictions grow over-confident. Per-step growth caps (1.02–1.5), AMSGrad
and larger d0 were measured as safeguards: a cap of 1.2 helps the digits (accuracy to Adam's) but costs the
300-step char-GPT 10%, so the defaults stay.

The update of step t does not use d_{t+1}, so a fused backend needs one pass per step (plus one extra
pass at the first step for n_0 and rms(α_0)).

The scalar rule is written once (``lrfree.scalar_math`` style) and run in torch or compiled into the fused
backends' two rule kernels: :func:`psdasgd_step_size` (n_0, d and λ, which the step pass needs) before the
step pass, :func:`psdasgd_shrink` and :func:`psdasgd_distance` (ρ, N and the new d) after it.
"""

from __future__ import annotations

import math

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import StepBatch
from ..scalar_math import M
from ._dadapt import DAdaptBase
from ._scaling import ScaledStep, init_scaling_state, scale_coefficients


def psdasgd_step_size(g0_norm, d, scaled_grad_sq, alpha_sq_sum, n_elements, d0, lr):
    """(n_0, d, λ) of the step: n_0 = ‖g/α‖ and d = d0·rms(α) are fixed at the first step with a
    non-zero gradient (``g0_norm`` is 0 until then; ``scaled_grad_sq`` = Σ c ‖g/α‖², ``alpha_sq_sum`` =
    Σ c α² over ``n_elements`` elements); λ = d γ / n_0 (γ = ``lr``)."""
    started = g0_norm > 0
    n0 = M.where(started, g0_norm, M.sqrt(scaled_grad_sq))
    d = M.where(started, d, d0 * M.sqrt(alpha_sq_sum / M.maximum(n_elements, 1.0)))
    return n0, d, M.safe_div(d * lr, n0, 0.0)


def psdasgd_shrink(t, max_ratio_sq, numerator):
    """(ρ, N/ρ): the max-scale-ratio ρ = max(1, max_j α_{t−1,j}/α_{t,j}) (1 at t = 1; ``max_ratio_sq`` is
    the max of α²_{t−1}/α²_t) and the numerator it shrinks, to which the step then adds λ ⟨g, s⟩."""
    ratio = M.where(t > 1, M.sqrt(M.maximum(max_ratio_sq, 1.0)), 1.0)
    return ratio, numerator / ratio


def psdasgd_distance(numerator, weighted_sq, d, growth_rate, ADAPT):
    """(d̂, d_{t+1}, proceed): D-Adapt SGD's estimate in the scaled space, d̂ = 2N / ‖α ⊙ s‖
    (``weighted_sq`` = Σ ‖α ⊙ s‖²/c), d_{t+1} = max(d, min(d̂, d · growth_rate)); d is frozen unless
    ``ADAPT`` (γ > 0). The step's scalars are kept only where ``proceed`` (‖α ⊙ s‖ > 0: with s = 0
    everywhere there is nothing to estimate)."""
    d_hat = M.safe_div(2.0 * numerator, M.sqrt(weighted_sq), 0.0)
    if ADAPT:
        d_next = M.maximum(d, M.minimum(d_hat, d * growth_rate))
    else:
        d_next = d
    return d_hat, d_next, weighted_sq > 0


class PSDASGD(DAdaptBase):
    """Parameter-scaled D-Adapt SGD: Adam's direction with a D-Adaptation step size; no learning rate.

    Args:
        params: parameters or param groups.
        lr: multiplier γ_t on the adapted step (1.0; schedule it with an lr_scheduler). Groups may differ:
            γ_t is the largest group lr and a group with lr = c·γ_t takes c times the shared step, with d
            estimated on the network reparametrized by x = c·u (module docstring); lr = 0 freezes a group.
        momentum: D-Adapt SGD's primal-averaging momentum μ (0 by default; per group). It needs β1 = 0:
            the paper's "a momentum of 0.9" is already β1 = 0.9, the default, and the two together are
            refused (they stacked to chance accuracy; module docstring).
        betas: (β1, β2): β1 is the momentum of the direction (an EMA of gradients, as in Adam), β2
            the decay of the second moment that defines the scale α.
        eps: ε in α² = √v̂ + ε.
        d0: initial distance estimate, in original (unscaled) coordinates.
        growth_rate: cap on the per-step growth of d (inf: uncapped).
        weight_decay: decoupled weight decay (AdamW-style, per group).
        amsgrad: AMSGrad scaling (α never decreases), the setting of the paper's convergence proof (per
            group; the max-scale-ratio shrink is then 1 only if every group uses it).
        scaling: ``"adam"`` (default) or ``"none"`` (α ≡ 1, i.e. D-Adapt SGD; for testing).
    """

    hyperparameters = {"lr": V.NONNEG, "momentum": V.UNIT_INTERVAL, "betas": V.betas(), "eps": V.POSITIVE,
                       "d0": V.POSITIVE, "growth_rate": V.GROWTH, "weight_decay": V.NONNEG, "amsgrad": V.BOOL,
                       "scaling": V.choice("adam", "none")}
    # momentum (primal averaging) and amsgrad are per group (see _group_hp); the rest define the one rule
    shared_hyperparameters = ("betas", "eps", "d0", "growth_rate", "scaling")
    kernels = "ps_dasgd"
    low_precision_state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "s")
    fused_rule = True

    def __init__(self, params, lr: float = 1.0, momentum: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 d0: float = 1e-6, growth_rate: float = math.inf, weight_decay: float = 0.0, amsgrad: bool = False,
                 *, scaling: str = "adam", backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None,
                 per_group_d: bool = False):
        defaults = dict(lr=lr, momentum=momentum, betas=V.as_tuple(betas), eps=eps, d0=d0, growth_rate=growth_rate,
                        weight_decay=weight_decay, amsgrad=amsgrad, scaling=scaling)
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded,
                         per_group_d=per_group_d)

    def _validate_hyperparameters(self, owner, index, group, first):
        super()._validate_hyperparameters(owner, index, group, first)
        beta1 = (group if self.per_group_d else first)["betas"][0]
        if group["momentum"] > 0 and beta1 > 0:
            raise ValueError(
                f"{owner} param_groups[{index}]: momentum={group['momentum']} is D-Adapt SGD's primal averaging "
                f"and betas[0]={beta1} is Adam's gradient EMA, which already is the paper's 'a momentum of "
                "0.9' (the default). The two stack, and together trained a digits MLP to chance accuracy. "
                "For the paper's method leave momentum at 0; for the averaging instead, pass "
                "betas=(0.0, 0.999) with it (measured worse than the EMA: docs/RESULTS.md).")

    def _group_hp(self, group: dict) -> dict:
        """The hyperparameters a tensor of ``group`` steps with: the rule group's, with the group's own
        ``momentum`` and ``amsgrad``. Both are sound per group: primal averaging only post-processes the
        group's own iterate (x = μx + (1−μ)(x0 − s); d's statistics read s and the gradients, not μ), and an AMSGrad
        group only keeps its own α from decreasing — the max-scale-ratio ρ is the max over every tensor,
        so it is 1 exactly when every group uses AMSGrad."""
        return {**self.rule_group(group), "momentum": group["momentum"], "amsgrad": group["amsgrad"]}

    def init_state(self, p, group):
        hp = self._group_hp(group)
        state = init_scaling_state(self, p, group, hp)
        state["s"] = self.zeros_state(p)
        if hp["momentum"] > 0:
            state["x0"] = self.copy_of(p)
        return state

    def _d_scalars(self, group):
        d0 = group["d0"]
        return {"d": d0, "d_hat": d0, "numerator": 0.0, "g0_norm": 0.0, "step_size": 0.0, "scale_ratio": 1.0}

    def _has_rule_kernel(self) -> bool:
        # per-group d steps every group as its own optimizer (DAdaptBase._update), and counts the run's
        # steps from batch.ok after the groups: its rules run in torch
        return self.fused_rule and not self.per_group_d

    def _update_d(self, batch: StepBatch) -> None:
        S = self.S
        hp = self.rule_group()
        lr = self._shared_lr()
        keep = [i for i, it in enumerate(batch.items) if it.group["lr"] > 0]  # lr = 0: frozen
        sub = batch.subset(keep)
        if batch.rule_kernel:
            return self._pass("psdasgd_rule_step")(batch, sub)
        if not sub.items:
            return
        ratios, coefficients, start = self._start(sub)
        ratio_vec = sub.vector(ratios)
        n_elements = torch.full((), float(sum(it.p.numel() for it in sub.items)), dtype=torch.float64,
                                device=batch.device)
        start, n_elements = sub.sync(start, n_elements)
        g0_norm, d, dlr = psdasgd_step_size(S["g0_norm"], S["d"], sub.reduce(start[:, 0]), sub.reduce(start[:, 1]),
                                            n_elements, hp["d0"], lr)
        ok = batch.ok
        # one pass: ⟨g, s_old⟩, ‖α ⊙ s_new‖² and max α_prev/α per tensor; v, m, s and x updated (step c λ)
        stats = self._pass("psdasgd_step")(sub, coefficients, dlr * ratio_vec)
        sums, = sub.sync(stats[:, :2])
        max_ratio_sq = sub.sync_max(stats[:, 2].max())
        # ‖α ⊙ s‖ in the reparametrized coordinates: Σ ‖α ⊙ s‖² / c (s is the displacement of x)
        weighted_sq = sub.reduce(sub.vector(1.0 / c for c in ratios) * sums[:, 1])
        ratio, shrunk = psdasgd_shrink(S["steps"] + 1, max_ratio_sq, S["numerator"])
        numerator = sub.reduce(dlr * sums[:, 0], start=shrunk)
        d_hat, d_next, proceed = psdasgd_distance(numerator, weighted_sq, d, hp["growth_rate"], lr > 0)
        proceed = ok & proceed
        self._set_all(dict(numerator=numerator, d_hat=d_hat, d=d_next, g0_norm=g0_norm, step_size=dlr,
                           scale_ratio=ratio), proceed)
        S["steps"].add_(proceed.to(torch.float64))

    def _start(self, sub: StepBatch) -> tuple[list[float], torch.Tensor, torch.Tensor]:
        """(lr ratios c, scaling coefficients, start statistics) of the adapting tensors ``sub``: the start
        pass, once per step."""
        cached = sub.__dict__.get("_psdasgd_start")
        if cached is None:
            # per-tensor lr ratios c (methods/_dadapt.py: the network reparametrized by x = c·u, where the
            # scaled gradient is √c g/α and α² becomes c α²)
            ratios = self._lr_ratios(sub)
            coefficients, started = scale_coefficients(sub, self.rule_group(), self.S["steps"], self.S["g0_norm"])
            # n_0 and rms(α_0) come from the first step with a non-zero gradient (fused: a small persistent
            # launch that streams nothing after that, and gives the global sums as one (1, 2) row; the
            # reference computes them every step)
            start = self._pass("psdasgd_start")(sub, coefficients, started, sub.vector(ratios))
            cached = sub.__dict__["_psdasgd_start"] = (ratios, coefficients, start)
        return cached

    def _finite_witness(self, batch: StepBatch) -> torch.Tensor:
        # the reference's start pass reads every gradient each step, and Σ c ‖g/α‖² is non-finite whenever
        # a gradient element is (or its square overflows the state's precision, as for PS-SPS): it doubles
        # as the guard when it covers every tensor. The fused start pass stops reading after the first step.
        if batch.fused or self.per_group_d or any(it.group["lr"] == 0 for it in batch.items):
            return super()._finite_witness(batch)
        return self._start(batch)[2][:, 0].sum()

    def _rule_hyperparameters(self, adapting: StepBatch) -> tuple[float, ...]:
        """The host values the rule kernels read (``lrfree.kernels.ps_dasgd``): (d0, γ, growth rate, the
        number of elements of the ``adapting`` tensors, those with lr > 0)."""
        hp = self.rule_group()
        n_elements = sum(it.p.numel() for it in adapting.items)
        return float(hp["d0"]), float(self._shared_lr()), float(hp["growth_rate"]), float(n_elements)

    # -- torch reference passes --------------------------------------------------------------------
    def _scaled_step(self, c: R.Chunk, scale_ratio: bool = False) -> ScaledStep:
        return ScaledStep(self._group_hp(c.group), c, c.grads, self.S["steps"], scale_ratio)

    def _ref_psdasgd_start(self, batch: StepBatch, coefficients, started, ratios: torch.Tensor) -> torch.Tensor:
        def start(c: R.Chunk) -> torch.Tensor:
            st, g = self._scaled_step(c), c.grads
            return torch.stack([c.sum(g * g / st.alpha_sq), c.sum(st.alpha_sq)], dim=1) * \
                ratios.index_select(0, c.index).unsqueeze(1)
        return R.per_item(batch, start)

    def _ref_psdasgd_step(self, batch: StepBatch, coefficients, steps: torch.Tensor) -> torch.Tensor:
        """``steps``: every tensor's c λ (fp64, one per item)."""
        ok = batch.ok

        def step(c: R.Chunk) -> torch.Tensor:
            st = self._scaled_step(c, scale_ratio=True)
            dlr = c.per_tensor(steps)
            momentum = c.group["momentum"]
            averaging = 1.0 - momentum
            x, g = c.params, c.grads
            u = st.direction
            if c.group["weight_decay"] != 0:
                u = R.axpy(u, x, c.group["weight_decay"])
            s = c.state("s")
            s_next = R.axpy(s, u, dlr)
            stats = torch.stack([c.dot(g, s), c.sum(s_next * s_next * st.alpha_sq),
                                 st.scale_ratio.square()], dim=1)
            if momentum > 0:
                x_next = R.axpy(x * (1.0 - averaging), c.state("x0") - s_next, averaging)
            else:
                x_next = R.axpy(x, u, -dlr)
            st.commit(ok)
            c.commit_state("s", s_next, ok)
            c.commit_params(x_next, ok)
            return stats
        return R.per_item(batch, step)
