"""GLyDER: the locally optimal step along any optimizer's direction (Yehudai et al., AISTATS 2025).

For a direction d_t and f smooth along it, f(x − ηd) ≈ f(x) − η⟨∇f, d⟩ + ½η² dᵀ∇²f d, so the step that
decreases f most is (ALGORITHMS §3.1)::

    η_t = ⟨∇f(x_t), d_t⟩ / dᵀHd          (= ⟨∇f, d⟩ / (L‖d‖²) with a global smoothness bound L)

GLyDER wraps a base optimizer: the base chooses the direction (its update), GLyDER how far to go, with one
tunable multiplier — the group ``lr`` (default 1; a scheduler may act on it) — and no warm-up or schedule.

The paper's practical estimators are not public (ALGORITHMS §3.2); lrfree offers these, each documented
with its cost:

``gradient`` — the estimate a of ∇f in the numerator ⟨a, d⟩:
  * ``"batch"``: the minibatch gradient the direction came from. Free; biased upward by the gradient
    noise along d (the step is too long when the noise dominates).
  * ``"split"``: unbiased. Call :meth:`GLyDER.split_backward` with the losses of two halves of the batch:
    the direction uses one half, the inner product the other. Same FLOPs; one extra gradient buffer.

``curvature`` — the estimate of dᵀHd in the denominator:
  * ``"gnb"`` (cross-entropy losses): Gauss–Newton–Bartlett. Call :meth:`GLyDER.gnb_backward` with the
    logits: labels ŷ ~ softmax(logits) are sampled, ĝ = ∇ CE(logits, ŷ) (batch mean over B examples), and
    B⟨ĝ, d⟩² is an unbiased estimate of dᵀGd for the batch-averaged Gauss–Newton matrix G (Bartlett's
    identity kills the cross terms). Costs one extra backward (the forward is reused) and a buffer.
  * ``"fd"``: the 1-d projection by a finite difference, (⟨∇f(x + hd), d⟩ − ⟨∇f(x), d⟩)/h with h‖d‖ =
    ``fd_step``: pass a ``closure`` that recomputes the loss and gradients to :meth:`step`. Exact on
    quadratics. Costs one extra forward/backward and a parameter copy; runs as torch ops on every backend.
  * ``"constant"``: a known smoothness bound L (``smoothness=L``): dᵀHd = L‖d‖². Free.

Both scalars are smoothed by EMAs of factor ``beta`` (N ← βN + (1−β)⟨a, d⟩, Q ← βQ + (1−β)q with q this
step's estimate of dᵀHd); the proposed step is max(N, 0) / Q. Everything is on the device, fp64; a step
never synchronizes.

Safeguards (the default must not need ``lr`` tuned to stay stable; lrfree's additions — which safeguards the
paper uses, if any, is not public, ALGORITHMS §3.2):

* **Growth cap** (``growth_rate``, default 1.02): η_t = min(max(N, 0)/Q, growth_rate · η_{t−1}), any decrease
  allowed, and η_{−1} is the base's own step — its ``lr`` for the fused Adam direction (d = m̂/(√v̂+ε) is
  the base's update divided by its lr), 1 for a generic base (d is the base's update). The applied step is
  ``lr`` · η. Why: one GNB draw is B⟨ĝ, d⟩² = dᵀGd · z² with z ≈ N(0, 1), unbiased but heavy-tailed
  towards 0, and 1/Q has no mean. Measured at the first step of a 20-64-64-5 tanh MLP (batch 32, Adam
  direction): the mean over 2000 draws gives η = 0.056 (where the batch loss is lowest along d), the draw
  the step used gave 13.5 (the 0.4% quantile of q), and the loss went 1.6 → 125. Later, a saturating
  softmax shrinks the Gauss–Newton curvature, the step grows, the softmax saturates further: η reached
  1e12 and the logits overflowed. With the cap the step starts at the base's own step and
  doubles at most every 35 steps; where the estimate is lower, the estimate rules. ``growth_rate=math.inf``
  is the uncapped rule (and the first step is then the estimate's).
* **Invalid curvature skips the estimate**: a step whose curvature estimate q is non-finite or ≤ 0 (a
  finite difference through a non-finite or concave probe, a GNB product that is exactly 0) leaves N, Q
  and η as they were, steps with the previous η (0 before the first valid estimate: the base's state
  advances, the parameters stay) and counts it in ``scalars()["curvature_skips"]``. Previously a NaN
  estimate stayed in the EMA for good. Non-finite logits in :meth:`GLyDER.gnb_backward` sample labels
  uniformly instead of raising in ``torch.multinomial``; the gradients are non-finite then, so the step's
  non-finite guard skips the step.

Directions: with ``lrfree.Adam``/``AdamW`` as the base, d = m̂/(√v̂ + ε) (+ wd·x, AdamW) is formed in
registers in one fused pass (A) that reduces ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩ and ⟨g, d⟩ per tensor; a second pass (B)
applies x ← x − lr·η·d. With the non-finite guard on, A writes nothing and its Σg², Σĝ², Σa² are the guard,
and B stores the new m and v with x; otherwise A stores m and v (see ``lrfree.kernels.glyder``). Single-
process, the step-size rule (``glyder_rule``) runs between them as one launch with the accept decision, the
counters, the step counts and every tensor's coefficient, and one launch before A forms every tensor's bias
corrections (``adam_bias_corrections``): with the statistics' reduction, a step is five launches. The torch
backend, data-parallel steps and the finite difference call the same ``glyder_rule`` on 0-d tensors. The
base's own lr is not used. Any other optimizer (a torch optimizer, another lrfree method) takes its
ordinary step and d = x_before − x_after is materialized (one extra parameter-sized buffer); the base's lr
then only sets the scale of d, which η divides out, and the gradient in ⟨a, d⟩ is ``p.grad`` (a base's own
L2 weight decay is not part of it).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import validation as V
from .backends import torch_ref as R
from .methods.adam import Adam, AdamW, commit_moments_, new_moments
from .optimizer import FusedOptimizer, StepBatch
from .scalar_math import M

__all__ = ["GLyDER", "sampled_label_gradient"]

GRADIENTS = ("batch", "split")
CURVATURES = ("gnb", "fd", "constant")
# columns of the per-tensor statistics: ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩; when the fused pass A is the non-finite
# guard (GLyDER._pass_a_guards) also Σg², Σĝ², Σa² (the latter two 0 without ĝ or a)
NUMERATOR, DIR_SQ, GNB, GRAD_DOT, GRAD_SQ, GNB_SQ, PROBE_SQ = range(7)
# glyder_rule's compile-time curvature flag: CURVATURES.index(curvature)
CURVATURE_GNB, CURVATURE_FD, CURVATURE_CONSTANT = range(3)
# the store scalars glyder_rule reads and returns, in its order
RULE_STATE = ("numerator", "curvature", "step_size", "dir_norm", "step_size_cap", "capped", "curvature_skips")


def glyder_rule(inner, dir_sq, gnb_dot, probe_q, numerator, curvature, step_size, cap, capped, skips, h, CURVATURE,
                CAPPED):
    """GLyDER's step size (``lrfree.scalar_math`` style): η = min(max(N, 0)/Q, cap) from the step's summed
    ⟨a, d⟩ (``inner``), ‖d‖², ⟨ĝ, d⟩ and, for the finite difference, its curvature ``probe_q``; the state
    is RULE_STATE (N, Q, η, ‖d‖, the cap, the capped and curvature-skip counts) and ``h`` = (β, growth_rate,
    smoothness, GNB examples B). A step whose curvature estimate q is non-finite or <= 0 keeps N, Q and η
    (see the module docstring). CURVATURE: CURVATURE_GNB/FD/CONSTANT; CAPPED: growth_rate is finite.
    Returns the new values of RULE_STATE."""
    beta = M.at(h, 0)
    if CURVATURE == CURVATURE_GNB:
        q = M.at(h, 3) * (gnb_dot * gnb_dot)
    elif CURVATURE == CURVATURE_CONSTANT:
        q = M.at(h, 2) * dir_sq
    else:
        q = probe_q
    valid = M.isfinite(q) & (q > 0)  # a select, so a NaN q never reaches the EMAs
    numerator_new = M.where(valid, beta * numerator + (1.0 - beta) * inner, numerator)
    curvature_new = M.where(valid, beta * curvature + (1.0 - beta) * q, curvature)
    proposed = M.safe_div(M.maximum(numerator_new, 0.0), curvature_new, 0.0)
    if CAPPED:
        eta = M.minimum(proposed, cap)
        capped_new = capped + M.where(valid & (proposed > cap), 1.0, 0.0)
    else:
        eta = proposed
        capped_new = capped
    eta = M.where(valid, eta, step_size)
    # a zero step (N <= 0: no evidence of descent) keeps the cap, so the next positive estimate is not held
    # at 0 forever
    cap_new = M.where(valid & (eta > 0), eta * M.at(h, 1), cap)
    return (numerator_new, curvature_new, eta, M.sqrt(dir_sq), cap_new, capped_new,
            skips + M.where(valid, 0.0, 1.0))


def adam_bias_corrections(t, beta1, beta2):
    """The Adam direction's per-tensor factors at step t: 1/(1 − β1^t) and 1/√(1 − β2^t)."""
    return 1.0 / (1.0 - M.pow(beta1, t)), 1.0 / M.sqrt(1.0 - M.pow(beta2, t))


def sampled_label_gradient(logits: torch.Tensor, params: list[torch.Tensor],
                           generator: torch.Generator | None = None) -> tuple[list[torch.Tensor], int]:
    """(ĝ, B): the parameter gradient of the batch-mean cross-entropy of ``logits`` (…, C) against labels
    drawn from their own softmax, and the number B of examples. E[B ĝĝᵀ] is the batch-averaged
    Gauss–Newton matrix, so B⟨ĝ, d⟩² estimates dᵀGd without bias. The graph of ``logits`` is kept."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        probs = torch.softmax(flat.detach().float(), dim=-1)
        # a row with a non-finite logit has NaN probabilities, on which torch.multinomial raises (a device
        # assert on CUDA); sample it uniformly: its loss and ĝ are non-finite, so the step skips anyway
        finite = torch.isfinite(probs).all(dim=-1, keepdim=True)
        probs = torch.where(finite, probs, torch.ones_like(probs))
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    loss = F.cross_entropy(flat, labels)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], flat.shape[0]


class GLyDER(FusedOptimizer):
    """The locally optimal step size along ``base``'s direction.

    Args:
        base: the optimizer whose update is the direction (``lrfree.Adam``/``AdamW``: fused; any other
            ``torch.optim.Optimizer``: generic, see the module docstring).
        lr: the multiplier on the locally optimal step (default 1).
        gradient: ``"batch"`` or ``"split"`` (needs :meth:`split_backward`).
        curvature: ``"gnb"`` (needs :meth:`gnb_backward`), ``"fd"`` (needs a closure) or ``"constant"``
            (needs ``smoothness``).
        beta: EMA factor of the numerator and curvature estimates (0: this step's estimates only).
        growth_rate: the step size may grow by at most this factor per step, starting from the base's own
            step (see the module docstring; ``math.inf``: uncapped).
        smoothness: the bound L of ``curvature="constant"``.
        fd_step: how far (in parameter norm) the finite difference probes along d.
        backend: of the fused Adam direction (default: the base's).
    """

    hyperparameters = {"lr": V.NONNEG}
    kernels = "glyder"
    low_precision_state = Adam.low_precision_state  # the Adam direction's moments (a generic base keeps its own)

    def __init__(self, base: torch.optim.Optimizer, lr: float = 1.0, *, gradient: str = "batch",
                 curvature: str = "gnb", beta: float = 0.9, growth_rate: float = 1.02, smoothness: float | None = None,
                 fd_step: float = 1e-3, backend: str | None = None, skip_nonfinite: bool = True):
        owner = type(self).__name__
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"{owner}: base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, GLyDER):
            raise TypeError(f"{owner}: base is already a GLyDER")
        V.choice(*GRADIENTS)(owner, "gradient", gradient)
        V.choice(*CURVATURES)(owner, "curvature", curvature)
        V.UNIT_INTERVAL(owner, "beta", beta)
        V.GROWTH(owner, "growth_rate", growth_rate)
        V.POSITIVE(owner, "fd_step", fd_step)
        if curvature == "constant":
            if smoothness is None:
                raise ValueError(f"{owner}: curvature='constant' needs smoothness=L, a bound on the curvature")
            V.POSITIVE(owner, "smoothness", smoothness)
        elif smoothness is not None:
            raise ValueError(f"{owner}: smoothness={smoothness!r} is only used with curvature='constant'")
        self.base, self.gradient, self.curvature = base, gradient, curvature
        self.beta, self.smoothness, self.fd_step = beta, smoothness, fd_step
        self.growth_rate = float(growth_rate)
        # the fused Adam direction, or the generic "step the base and take the difference"
        self.adam_direction = type(base) in (Adam, AdamW)
        # where the growth cap starts: the base's own step, in units of d (read once, here, on the host)
        self.initial_step_size = float(base.param_groups[0]["lr"]) if self.adam_direction else 1.0
        if not self.initial_step_size > 0 and not math.isinf(self.growth_rate):
            raise ValueError(f"{owner}: the growth cap (growth_rate={growth_rate!r}) starts from the base's own step, "
                             f"its lr, which is {self.initial_step_size!r}: give the base a positive lr, or pass "
                             "growth_rate=math.inf")
        if self.adam_direction:
            for i, group in enumerate(base.param_groups):
                if group["maximize"]:
                    raise ValueError(f"{owner}: base param_groups[{i}] has maximize=True; GLyDER minimizes")
        self.decoupled = self.adam_direction and base.decoupled
        self.requires_loss = bool(getattr(base, "requires_loss", False))
        self._probe: dict[torch.Tensor, torch.Tensor] = {}  # the other half's gradient ("split")
        self._gnb: dict[torch.Tensor, torch.Tensor] = {}  # ĝ of sampled labels ("gnb")
        self._gnb_examples = 0
        groups = [{**{k: v for k, v in g.items() if k != "lr"}, "params": list(g["params"]), "lr": lr}
                  for g in base.param_groups]
        if backend is None:
            backend = getattr(base, "backend", "auto")
        # the Adam direction keeps the base's moments, stored as the base stores them
        state_dtype = base.state_dtype if self.adam_direction else None
        super().__init__(groups, {"lr": lr}, backend=backend if self.adam_direction else "torch",
                         skip_nonfinite=skip_nonfinite, state_dtype=state_dtype)

    # ------------------------------------------------------------------ the training loop's side
    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def gnb_backward(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Store the sampled-label gradient ĝ of ``logits`` (call after the forward, before or after
        ``loss.backward(retain_graph=True)``): one extra backward through the same graph."""
        params = self._trainable()
        grads, examples = sampled_label_gradient(logits, params, generator)
        self.set_gnb_gradient(grads, examples)

    def set_gnb_gradient(self, grads: list[torch.Tensor], examples: int) -> None:
        """Give the sampled-label gradient ĝ (one tensor per trainable parameter, in param-group order)
        and its number B of examples yourself, e.g. computed by a fused loss kernel."""
        self._gnb = self._buffers("set_gnb_gradient", grads)
        self._gnb_examples = int(examples)

    def split_backward(self, probe_loss: torch.Tensor, direction_loss: torch.Tensor) -> None:
        """The losses of two halves of a batch: ``direction_loss``'s gradient goes to ``.grad`` (the base's
        direction), ``probe_loss``'s is kept for the unbiased inner product ⟨∇f, d⟩."""
        params = self._trainable()
        grads = torch.autograd.grad(probe_loss, params, retain_graph=True, allow_unused=True)
        self._probe = self._buffers("split_backward", [torch.zeros_like(p) if g is None else g
                                                       for p, g in zip(params, grads)])
        direction_loss.backward()

    def _buffers(self, where: str, grads: list[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        params = self._trainable()
        if len(grads) != len(params) or any(g.shape != p.shape for g, p in zip(grads, params)):
            raise ValueError(f"{type(self).__name__}.{where}: expected one gradient per trainable parameter "
                             f"({len(params)}), shaped like it")
        return dict(zip(params, grads))  # the step's non-finite guard covers them too (_finite_witness)

    # ------------------------------------------------------------------ state
    def init_state(self, p, group):
        # the Adam direction keeps the base's own moments; a generic base keeps its state itself
        return self.base.init_state(p, group) if self.adam_direction else {}

    def initial_scalars(self):
        # step_size_cap: the most η may be in the next step (growth_rate × the last positive η); capped and
        # curvature_skips count the steps the growth cap shortened and those whose curvature estimate was
        # dropped (non-finite or <= 0)
        return {"numerator": 0.0, "curvature": 0.0, "step_size": 0.0, "dir_norm": 0.0,
                "step_size_cap": math.inf if math.isinf(self.growth_rate) else self.initial_step_size * self.growth_rate,
                "capped": 0.0, "curvature_skips": 0.0}

    def initial_tensor_scalars(self, group, p):
        return {"step": 0.0} if self.adam_direction else {}

    rule = staticmethod(glyder_rule)
    bias_corrections = staticmethod(adam_bias_corrections)

    def _has_rule_kernel(self) -> bool:
        # the fused Adam direction; the finite difference runs its closure between the statistics and the
        # rule (torch ops), so it keeps the torch rule
        return self.adam_direction and self.curvature != "fd"

    def _rule_hyperparameters(self) -> tuple[float, float, float, float]:
        """glyder_rule's ``h``."""
        return (self.beta, self.growth_rate, 0.0 if self.smoothness is None else float(self.smoothness),
                float(self._gnb_examples))

    def _rule_flags(self) -> tuple[int, bool]:
        """glyder_rule's compile-time (CURVATURE, CAPPED)."""
        return CURVATURES.index(self.curvature), not math.isinf(self.growth_rate)

    # ------------------------------------------------------------------ step
    @torch.compiler.disable  # as FusedOptimizer.step: one opaque eager call inside compiled code
    def step(self, closure: Callable[[], Any] | None = None, loss: Any = None) -> Any:
        """One step. ``closure`` (re-evaluates loss and gradients) is required by ``curvature="fd"``, which
        calls it again at the probe point; otherwise it is optional, as for any optimizer."""
        owner = type(self).__name__
        if self.curvature == "fd" and closure is None:
            raise ValueError(f"{owner}(curvature='fd') probes the gradient along d: call step(closure) with a "
                             "closure that zeroes the gradients, recomputes the loss, backpropagates and returns it")
        if self.curvature == "gnb" and not self._gnb:
            raise ValueError(f"{owner}(curvature='gnb') needs opt.gnb_backward(logits) after the forward pass of "
                             "every step")
        if self.gradient == "split" and not self._probe:
            raise ValueError(f"{owner}(gradient='split') needs opt.split_backward(loss_half_a, loss_half_b) instead "
                             "of loss.backward() in every step")
        self._closure = closure
        try:
            # the base step runs the closure once and decides which loss the step takes (see its docstring)
            return super().step(closure=closure, loss=loss)
        finally:
            self._closure = None
            self._gnb, self._probe = {}, {}

    @property
    def _pass_a_guards(self) -> bool:
        """The structure of the fused Adam-direction step: True when pass A commits nothing and is the
        non-finite guard (its Σg², Σĝ², Σa² columns), pass B then forming and storing m and v — one pass over
        the gradients fewer than a separate guard, for 4 B/element more in B (g read again). False without the
        guard (A stores m and v, B reads them: the minimal traffic), on the torch reference (its stats pass
        stores m and v after a guard of its own), and for curvature="fd", whose closure overwrites the
        gradients before B could read them."""
        return (self.adam_direction and self.skip_nonfinite and self.curvature != "fd"
                and self._backend in ("triton", "cuda"))

    @property
    def _reference_stats_guard(self) -> bool:
        """The torch reference's counterpart of :attr:`_pass_a_guards`: its stats pass is the non-finite guard
        (every column is non-finite when g, ĝ or a is: d is formed from the new m and v), and the apply pass
        stores m and v once the step is decided. That saves the reference a Σg² pass over the gradients and
        a norm of ĝ per tensor, for m and v held from one pass to the next: on GPT-2's layout on a CPU (148
        tensors, 2 threads, both variants timed in turn in one process) 7.3 → 6.5 ms per step. Not for
        curvature="fd", as above."""
        return (self.adam_direction and self.skip_nonfinite and self.curvature != "fd"
                and self._backend == "torch")

    def _finite_witness(self, batch: StepBatch) -> torch.Tensor:
        if self._pass_a_guards:
            return self._adam_stats(batch)[2][:, GRAD_SQ:].sum()
        if self._reference_stats_guard:
            return self._adam_stats(batch)[2].sum()
        # Σg² and the squared norms of the extra gradients (ĝ, the probe half's), one foreach op each
        extra = [torch.stack(torch._foreach_norm(list(buf.values()))).double().square().sum()
                 for buf in (self._gnb, self._probe) if buf]
        return batch.total(extra, batch.local_grad_sq.sum())

    def _update(self, batch: StepBatch) -> None:
        if batch.rule_kernel:  # the fused Adam direction, single-process
            self._fused_adam_update(batch)
            return
        if self.adam_direction:
            self._adam_update(batch)
        else:
            self._generic_update(batch)
        self.S["steps"].add_(batch.ok.to(torch.float64))

    # -- the scalar rule on 0-d tensors (the torch backend, data-parallel steps, the finite difference) -------
    def _rule(self, stats: torch.Tensor, probe_curvature: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """glyder_rule on the step's summed statistics (columns NUMERATOR…GRAD_DOT)."""
        S = self.S
        new = glyder_rule(stats[NUMERATOR], stats[DIR_SQ], stats[GNB], probe_curvature,
                          *(S[name] for name in RULE_STATE[:3]), S["step_size_cap"], S["capped"],
                          S["curvature_skips"], self._coefficient_vector(self._rule_hyperparameters()),
                          *self._rule_flags())
        return dict(zip(RULE_STATE, new))

    def _commit_rule(self, new: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        self._set_all(new, ok)

    def _probe_curvature(self, batch: StepBatch, origin: list[torch.Tensor], directions: list[torch.Tensor],
                         dir_sq: torch.Tensor, grad_dot: torch.Tensor) -> torch.Tensor:
        """dᵀHd ≈ (⟨∇f(x + hd), d⟩ − ⟨∇f(x), d⟩)/h with h‖d‖ = fd_step (torch ops on every backend). Leaves
        every parameter at origin + h·d, where the closure ran: the caller puts them back."""
        h = R.safe_div(torch.full_like(dir_sq, self.fd_step), dir_sq.sqrt())
        for it, x, d in zip(batch.items, origin, directions):
            it.p.copy_(R.axpy(R.up(x, x), R.up(d, x), h))
        with torch.enable_grad():
            self._closure()
        probed = batch.reduce(torch.stack([R.dot(it.param.grad, d) for it, d in zip(batch.items, directions)]))
        probed, = batch.sync(probed)
        return R.safe_div(probed - grad_dot, h)

    # -- generic direction: the base's own step, d = x_before − x_after ---------------------------------
    def _generic_update(self, batch: StepBatch) -> None:
        params = [it.p for it in batch.items]
        before = torch._foreach_mul(params, 1.0)
        loss = batch.loss
        if getattr(self.base, "requires_loss", False):
            self.base.step(loss=loss)
        else:
            self.base.step()
        directions = torch._foreach_sub(before, params)
        stats = torch.stack([self._ref_row(it, d) for it, d in zip(batch.items, directions)])
        stats, = batch.sync(batch.reduce_rows(stats))
        curvature = None
        if self.curvature == "fd":  # the parameters are rewritten from `before` below
            curvature = self._probe_curvature(batch, before, directions, stats[DIR_SQ], stats[GRAD_DOT])
        new = self._rule(stats, curvature)
        ok = batch.ok
        coef = batch.per_item("lr") * new["step_size"]
        for i, (it, x0, d) in enumerate(zip(batch.items, before, directions)):
            # a rejected step also undoes the base's (an lrfree base has skipped it already)
            it.p.copy_(torch.where(ok, R.axpy(R.up(x0, x0), R.up(d, x0), -coef[i]).to(it.p.dtype), x0))
        self._commit_rule(new, ok)

    def _ref_row(self, it, d: torch.Tensor) -> torch.Tensor:
        """[⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩] of one tensor, fp64."""
        g = it.g
        a = self._probe[it.param] if self.gradient == "split" else g
        gnb = R.dot(self._gnb[it.param], d) if self.curvature == "gnb" else torch.zeros((), dtype=torch.float64,
                                                                                        device=d.device)
        return torch.stack([R.dot(a, d), R.sumsq(d), gnb, R.dot(g, d)])

    # -- fused Adam direction ---------------------------------------------------------------------------
    def _fused_adam_update(self, batch: StepBatch) -> None:
        """One process: pass A's statistics, the rule kernel (accept decision, rule, store, counters, step
        counts and every tensor's coefficient lr·η) and pass B; the fused passes read the step counts from
        the store (their ``step`` argument is the reference's)."""
        stats = self._pass("glyder_adam_stats")(batch, None, self._probe or None, self._gnb or None)
        coef = self._pass("glyder_rule")(batch, stats)
        self._pass("glyder_adam_apply")(batch, None, coef)

    def _adam_stats(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(item index, Adam step t, per-tensor statistics over this rank's elements) of pass A, once per
        step: run by the guard when pass A is the guard, else by the update."""
        cached = batch.__dict__.get("_glyder_stats")
        if cached is None:
            index = batch.index(it.flat_index for it in batch.items)
            step = self.S["step"].index_select(0, index) + 1
            # pass A: per tensor ⟨a, d⟩, ‖d‖², ⟨ĝ, d⟩, ⟨g, d⟩ with m, v and d formed in registers
            stats = self._pass("glyder_adam_stats")(batch, step, self._probe or None, self._gnb or None)
            cached = batch._glyder_stats = (index, step, stats)
        return cached

    def _adam_update(self, batch: StepBatch) -> None:
        index, step, stats = self._adam_stats(batch)
        stats, = batch.sync(batch.reduce_rows(stats))
        curvature = None
        if self.curvature == "fd":
            params = [it.p for it in batch.items]
            origin = torch._foreach_mul(params, 1.0)
            curvature = self._probe_curvature(batch, origin, self._adam_directions(batch, step), stats[DIR_SQ],
                                              stats[GRAD_DOT])
            torch._foreach_copy_(params, origin)
        new = self._rule(stats, curvature)
        # pass B: x ← x − lr η d, d recomputed from the new m and v (and m, v stored when A is the guard)
        self._pass("glyder_adam_apply")(batch, step, batch.per_item("lr") * new["step_size"])
        self._set_at("step", index, step, batch.ok)
        self._commit_rule(new, batch.ok)

    def _adam_direction(self, c: R.Chunk, m: torch.Tensor, v: torch.Tensor, t: torch.Tensor, x: torch.Tensor):
        """d of the tensors of chunk ``c`` (``t``: every item's Adam step, fp64, one per item of the batch)."""
        group = c.group
        beta1, beta2 = group["betas"]
        d = (m / c.per_tensor(1 - beta1 ** t)) / (v.sqrt() / c.per_tensor((1 - beta2 ** t).sqrt()) + group["eps"])
        if self.decoupled and group["weight_decay"] != 0:
            d = R.axpy(d, x, group["weight_decay"])
        return d

    def _stored_direction(self, c: R.Chunk, step: torch.Tensor) -> torch.Tensor:
        """d of chunk ``c`` from its current (committed) m and v, in the compute dtype."""
        v = c.state("max_exp_avg_sq" if c.group["amsgrad"] else "exp_avg_sq")
        return self._adam_direction(c, c.state("exp_avg"), v, step, c.params)

    def _adam_directions(self, batch: StepBatch, step: torch.Tensor) -> list[torch.Tensor]:
        """d of every tensor from the current m and v, in the compute dtype (torch ops), in item order."""
        out: list[torch.Tensor | None] = [None] * len(batch.items)
        for c in R.chunks(batch):
            for i, d in zip(c.positions, c.unpacked(self._stored_direction(c, step))):
                out[i] = d
        return out

    def _ref_glyder_adam_stats(self, batch: StepBatch, step: torch.Tensor, probe, gnb) -> torch.Tensor:
        deferred = self._reference_stats_guard  # the step is decided from these statistics: store m, v later
        ok = None if deferred else batch.ok

        def stats(c: R.Chunk) -> torch.Tensor:
            group = c.group
            x, g = c.params, c.grads
            if not self.decoupled and group["weight_decay"] != 0:
                g = R.axpy(g, x, group["weight_decay"])
            m, v, new = new_moments(c, g)
            if deferred:
                c.__dict__["_glyder_moments"] = new  # the chunk lives as long as the step's batch
            else:
                commit_moments_(c, new, ok)
            d = self._adam_direction(c, m, v, step, x)
            grad_dot = c.dot(g, d)
            # ⟨a, d⟩: the probe half's gradient, or this one's ("batch": the same reduction)
            a_dot = c.dot(c.load("probe", [probe[it.param] for it in c.items]), d) if probe is not None else grad_dot
            gnb_dot = (c.dot(c.load("gnb", [gnb[it.param] for it in c.items]), d) if gnb is not None
                       else torch.zeros(len(c), dtype=torch.float64, device=d.device))
            return torch.stack([a_dot, c.sumsq(d), gnb_dot, grad_dot], dim=1)
        return R.per_item(batch, stats)

    def _ref_glyder_adam_apply(self, batch: StepBatch, step: torch.Tensor, coef: torch.Tensor) -> None:
        for c in R.chunks(batch):
            new = c.__dict__.pop("_glyder_moments", None)
            if new is not None:  # the stats pass was the guard (_reference_stats_guard): m, v stored now
                commit_moments_(c, new, batch.ok)
            c.commit_params(R.axpy(c.params, self._stored_direction(c, step), -c.per_tensor(coef)), batch.ok)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if not self.adam_direction:  # beside the scalars, in group 0's entry (a top-level one is format 1)
            sd["param_groups"][0]["lrfree"]["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        base = state_dict.get("lrfree", {}).get("base")  # format 1
        groups = state_dict.get("param_groups") or [{}]
        if base is None and isinstance(groups[0].get("lrfree"), dict):
            base = groups[0]["lrfree"].get("base")
        if base is not None:
            self.base.load_state_dict(base)
