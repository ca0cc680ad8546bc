"""DoG and LDoG: "Distance over Gradients" (Ivgi, Hinder, Carmon, ICML 2023).

Semantics of the official ``dog-optimizer`` 1.0.3 (ALGORITHMS §4.4). DoG keeps one step size per
param group, LDoG one per tensor; for each such segment::

    t = 0:  r̄_0 = reps_rel · (1 + ‖x_0‖),          G_0 = ‖g_0‖² + eps
    t ≥ 1:  r̄_t = max(r̄_{t−1}, ‖x_t − x_0‖),       G_t = G_{t−1} + ‖g_t‖²
    η_t = lr · r̄_t / √G_t   (``init_eta`` overrides η_0),     x_{t+1} = x_t − η_t g_t

where g already includes coupled weight decay λx. ``lr`` (the paper's c) should stay 1; DoG is meant
to be used with polynomial iterate averaging (the official ``PolynomialDecayAverager``).

Pipeline: a stats pass reduces ‖g + λx‖² and ‖x − x_0‖² per tensor, the rule (``dog_rule``) runs on the
vector of segments, and the SGD apply pass uses each tensor's segment step. The stats pass writes nothing
and reads every gradient, so it is also the non-finite guard (``_finite_witness``): a step costs these two
passes. On a fused backend (single process) the rule runs in one launch between them, the rule kernel
``lrfree.kernels.dog.dog_rule``, with the accept decision, the counters and every tensor's step; the torch
backend and data-parallel steps call the same ``dog_rule`` on vectors of 0-d values.
‖x − x_0‖ is reduced from the x of this step, not carried over from the previous step's update pass
(which would save reading x once but is wrong whenever the parameters change between steps).

Differences from the reference, all where it would crash or sync: tensors whose gradient is None are
skipped (the reference raises); they still count in ‖x_0‖ and ‖x_t − x_0‖ of their group, exactly as the
reference does with a zero gradient. The weight decay is not written back into ``p.grad``. Each segment
counts its own t, so groups added with ``add_param_group`` later start their own schedule.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..distributed import local_real
from ..optimizer import FusedOptimizer, StepBatch
from ..scalar_math import M


def dog_rule(t, rbar, G, x0_norm, grad_sq, dist_sq, reps_rel, eps, lr, init_eta):
    """One segment's step (``lrfree.scalar_math`` style; element-wise over vectors of segments): from its
    accepted steps so far t, its state r̄, G and ‖x_0‖, this step's ‖g + λx‖² and ‖x − x_0‖² and its group's
    hyperparameters (``init_eta`` 0: none; the option is validated > 0), the new (r̄, G, η, t)."""
    first = t == 0
    rbar_new = M.where(first, reps_rel * (1.0 + x0_norm), M.maximum(rbar, M.sqrt(dist_sq)))
    G_new = M.where(first, grad_sq + eps, G + grad_sq)
    eta = M.safe_div(lr * rbar_new, M.sqrt(G_new), 0.0)
    eta = M.where(first & (init_eta > 0), init_eta, eta)
    return rbar_new, G_new, eta, t + 1.0


class DoG(FusedOptimizer):
    """Distance over Gradients, one step size per param group.

    Args:
        params: parameters or param groups.
        reps_rel: initial movement r_ε relative to 1 + ‖x_0‖ (1e-6; 1e-4 with batch norm).
        lr: the multiplier c on the step size; changing it from 1 is discouraged.
        weight_decay: coupled L2 penalty λ (added to the gradient before every statistic).
        eps: added once to G_0.
        init_eta: explicit first step size (then ``reps_rel`` is ignored).
    """

    hyperparameters = {"reps_rel": V.NONNEG, "lr": V.POSITIVE, "weight_decay": V.NONNEG, "eps": V.NONNEG,
                       "init_eta": V.optional(V.POSITIVE)}
    kernels = "dog"
    per_tensor = False
    fused_rule = True
    rule = staticmethod(dog_rule)

    def __init__(self, params, reps_rel: float = 1e-6, lr: float = 1.0, weight_decay: float = 0.0,
                 eps: float = 1e-8, init_eta: float | None = None, *, backend: str = "auto",
                 skip_nonfinite: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, state_dtype: torch.dtype | None = None, process_group=None,
                 sharded: bool | None = None):
        if init_eta is None and not reps_rel > 0:
            raise ValueError(f"{type(self).__name__}: invalid reps_rel={reps_rel!r}; expected a real number > 0 "
                             "(1e-6 is the suggested value, 1e-4 with batch normalization)")
        defaults = dict(reps_rel=0.0 if init_eta is not None else reps_rel, lr=lr, weight_decay=weight_decay,
                        eps=eps, init_eta=init_eta)
        self._x0_norm_ready: set[int] = set()
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite,
                         master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                         state_dtype=state_dtype,
                         process_group=process_group, sharded=sharded)

    def init_state(self, p, group):
        return {"x0": self.copy_of(p)}

    def _segment_scalars(self, group):
        return {"rbar": 0.0, "G": 0.0, "t": 0.0, "eta": 0.0, "x0_norm": 0.0}

    def initial_group_scalars(self, group):
        return {} if self.per_tensor else self._segment_scalars(group)

    def initial_tensor_scalars(self, group, p):
        return self._segment_scalars(group) if self.per_tensor else {}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._x0_norm_ready = set()

    def _segment(self, it) -> int:
        return it.flat_index if self.per_tensor else it.group_index

    def _new_anchors(self, batch: StepBatch) -> tuple[list[int], torch.Tensor]:
        """The segments stepping for the first time, and ‖x_0‖² of each over this rank's elements (a
        host-known set: not a per-step cost).

        Parameters of a segment without a gradient yet have not moved, so their x_0 is their value now.
        """
        segments, norms = [], []
        for it in batch.items:
            seg = self._segment(it)
            if seg in self._x0_norm_ready or seg in segments:
                continue
            # the parameters as their group lists them, which key the state (it.p is a local shard or a
            # master copy under FSDP2 or master_weights: its x0 would not be found after a resume)
            members = [it.param] if self.per_tensor else it.group["params"]
            segments.append(seg)
            norms.append(batch.total(R.sumsq(self.state[q]["x0"]) if "x0" in self.state.get(q, {})
                                     else R.sumsq(local_real(q)) for q in members))
        return segments, torch.stack(norms) if norms else batch.vector(())  # cached: no op on later steps

    def _stats(self, batch: StepBatch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(per-item weight decay or None, (items, 2) ‖g + λx‖², ‖x − x0‖² over this rank's elements): the
        stats pass, once per step (it writes nothing)."""
        cached = batch.__dict__.get("_dog_stats")
        if cached is None:
            decay = batch.per_item("weight_decay") if any(it.group["weight_decay"] for it in batch.items) else None
            cached = batch._dog_stats = (decay, self._pass("dog_stats")(batch, decay))
        return cached

    def _finite_witness(self, batch: StepBatch) -> torch.Tensor:
        # Σ‖g + λx‖² is non-finite whenever a gradient element is (x finite; or when a square overflows the
        # precision of the stats, as Σg²'s would), so the stats pass doubles as the guard
        return self._stats(batch)[1][:, 0].sum()

    def _update(self, batch: StepBatch) -> None:
        anchored, anchor_sq = self._new_anchors(batch)
        decay, stats = self._stats(batch)  # (items, 2): ‖g + λx‖², ‖x − x0‖²
        # segments of the step, in item order (items come group by group, so a segment is contiguous)
        segments, bounds = [], []
        for i, it in enumerate(batch.items):
            seg = self._segment(it)
            if not segments or segments[-1] != seg:
                segments.append(seg)
                bounds.append(i)
        bounds.append(len(batch.items))
        resting = self._resting_distances(batch, segments)
        if batch.rule_kernel:  # one launch: the accept decision, the rule, the store, the counters, every step
            self._store_anchors(anchored, anchor_sq)
            coef = self._pass("dog_rule")(batch, stats, segments, bounds, resting)
            self._pass("sgd_apply")(batch, coef, decay)
            return
        # every statistic of the step, made global in one collective when the parameters are sharded
        if resting is None:
            stats, anchor_sq = batch.sync(stats, anchor_sq)
        else:
            stats, anchor_sq, resting = batch.sync(stats, anchor_sq, resting)
        self._store_anchors(anchored, anchor_sq)
        ok = batch.ok
        if len(segments) == len(batch.items):
            grad_sq, dist_sq = stats[:, 0], stats[:, 1]
        else:
            grad_sq = torch.stack([batch.reduce(stats[a:b, 0]) for a, b in zip(bounds, bounds[1:])])
            dist_sq = torch.stack([batch.reduce(stats[a:b, 1]) for a, b in zip(bounds, bounds[1:])])
        if resting is not None:
            dist_sq = dist_sq + resting
        # every segment steps (the usual case): the store's vectors as they are, without indexing
        seg_index = None if segments == list(range(len(self.S["t"]))) else batch.index(segments)
        new = self._rule(seg_index, [batch.items[a].group for a in bounds[:-1]], grad_sq, dist_sq, batch)
        if seg_index is None:
            self._set_all(new, ok)
        else:
            for name, value in new.items():
                self._set_at(name, seg_index, value, ok)
        eta = new["eta"]
        if len(segments) != len(batch.items):  # each tensor's segment's step
            eta = eta.index_select(0, batch.index(k for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
                                                  for _ in range(a, b)))
        self._pass("sgd_apply")(batch, eta, decay)
        self.S["steps"].add_(ok.to(torch.float64))

    def _store_anchors(self, anchored: list[int], anchor_sq: torch.Tensor) -> None:
        """‖x_0‖ of the segments stepping for the first time (written whether or not the step is taken:
        x_0 does not change)."""
        for seg, norm_sq in zip(anchored, anchor_sq.unbind()):
            self.S["x0_norm"][seg].copy_(norm_sq.sqrt())
            self._x0_norm_ready.add(seg)

    def _resting_distances(self, batch: StepBatch, segments: list[int]) -> torch.Tensor | None:
        """Per segment, ‖x − x0‖² of parameters that moved earlier but have no gradient now (rare: plain
        torch), or None where no segment has any (LDoG never has: its segment is the tensor)."""
        if self.per_tensor:
            return None
        active = {id(it.param) for it in batch.items}
        resting = [[p for p in self.param_groups[seg]["params"]
                    if id(p) not in active and "x0" in self.state.get(p, {})] for seg in segments]
        if not any(resting):
            return None
        return torch.stack([batch.total(R.sumsq(R.up(self._stepped(p), x) - R.up(self.state[p]["x0"], x))
                                        for p in params for x in (local_real(p),)) for params in resting])

    # -- the scalar rule on vectors of 0-d values (the torch backend, data-parallel steps) ----------------
    def _rule(self, seg: torch.Tensor | None, groups: list[dict], grad_sq: torch.Tensor, dist_sq: torch.Tensor,
              batch: StepBatch) -> dict[str, torch.Tensor]:
        """The rule on the segments at ``seg`` (None: every segment, in order)."""
        S = self.S
        pick = (lambda name: S[name]) if seg is None else (lambda name: S[name].index_select(0, seg))
        rbar, G, eta, t_new = dog_rule(pick("t"), pick("rbar"), pick("G"), pick("x0_norm"), grad_sq, dist_sq,
                                       *(batch.vector(column) for column in zip(*self.segment_hyperparameters(groups))))
        return {"rbar": rbar, "G": G, "eta": eta, "t": t_new}

    @staticmethod
    def segment_hyperparameters(groups: list[dict]) -> list[tuple[float, float, float, float]]:
        """The rule's (reps_rel, eps, lr, init_eta) of every segment (``groups``: each segment's group);
        init_eta 0 stands for none."""
        return [(g["reps_rel"], g["eps"], g["lr"], 0.0 if g["init_eta"] is None else g["init_eta"]) for g in groups]

    # -- torch reference passes --------------------------------------------------------------------
    def _ref_dog_stats(self, batch: StepBatch, decay: torch.Tensor | None) -> torch.Tensor:
        def stats(c: R.Chunk) -> torch.Tensor:
            x = c.params
            g = c.grads if decay is None else R.axpy(c.grads, x, c.per_tensor(decay))
            return torch.stack([c.sumsq(g), c.sumsq(x - c.state("x0"))], dim=1)
        return R.per_item(batch, stats)

    def _ref_sgd_apply(self, batch, coef, decay=None) -> None:
        R.sgd_apply_(batch, coef, decay)


class LDoG(DoG):
    """Layer-wise DoG: the DoG rule with one step size per parameter tensor."""

    per_tensor = True
