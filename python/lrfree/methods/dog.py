"""DoG and LDoG: "Distance over Gradients" (Ivgi, Hinder, Carmon, ICML 2023).

Semantics of the official ``dog-optimizer`` 1.0.3 (ALGORITHMS §4.4). DoG keeps one step size per
param group, LDoG one per tensor; for each such segment::

    t = 0:  r̄_0 = reps_rel · (1 + ‖x_0‖),          G_0 = ‖g_0‖² + eps
    t ≥ 1:  r̄_t = max(r̄_{t−1}, ‖x_t − x_0‖),       G_t = G_{t−1} + ‖g_t‖²
    η_t = lr · r̄_t / √G_t   (``init_eta`` overrides η_0),     x_{t+1} = x_t − η_t g_t

where g already includes coupled weight decay λx. ``lr`` (the paper's c) should stay 1; DoG is meant
to be used with polynomial iterate averaging (the official ``PolynomialDecayAverager``).

Differences from the reference, all where it would crash or sync: tensors whose gradient is None are
skipped (the reference raises); they still count in ‖x_0‖ and ‖x_t − x_0‖ of their group, exactly as
the reference does with a zero gradient. The weight decay is not written back into ``p.grad``. Each
segment counts its own t, so groups added with ``add_param_group`` later start their own schedule.
"""

from __future__ import annotations

import torch

from .. import validation as V
from ..backends import torch_ref as R
from ..optimizer import FusedOptimizer, StepBatch


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
    per_tensor = False

    def __init__(self, params, reps_rel: float = 1e-6, lr: float = 1.0, weight_decay: float = 0.0,
                 eps: float = 1e-8, init_eta: float | None = None, *, backend: str = "auto",
                 skip_nonfinite: bool = True):
        if init_eta is None and not reps_rel > 0:
            raise ValueError(f"{type(self).__name__}: invalid reps_rel={reps_rel!r}; expected a real number > 0 "
                             "(1e-6 is the suggested value, 1e-4 with batch normalization)")
        defaults = dict(reps_rel=0.0 if init_eta is not None else reps_rel, lr=lr, weight_decay=weight_decay,
                        eps=eps, init_eta=init_eta)
        self._x0_norm_ready: set[int] = set()
        super().__init__(params, defaults, backend=backend, skip_nonfinite=skip_nonfinite)

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

    def _segment(self, group_index: int, flat_index: int) -> int:
        return flat_index if self.per_tensor else group_index

    def _anchor_all(self, batch: StepBatch) -> None:
        """Store x_0 for every parameter of a segment the first time the segment steps, and ‖x_0‖.

        Parameters of the segment without a gradient have not moved, so their x_0 is their value now.
        """
        for it in batch.items:
            seg = self._segment(it.group_index, it.flat_index)
            if seg in self._x0_norm_ready:
                continue
            members = [it.p] if self.per_tensor else it.group["params"]
            norm_sq = batch.total(R.sumsq(self.state[q]["x0"]) if "x0" in self.state.get(q, {}) else R.sumsq(q)
                                  for q in members)
            self.S["x0_norm"][seg].copy_(norm_sq.sqrt())
            self._x0_norm_ready.add(seg)

    def _rule(self, seg: int, group: dict, grad_sq: torch.Tensor, dist_sq: torch.Tensor) -> dict[str, torch.Tensor]:
        """One segment's DoG rule, from its reduced ‖g‖² and ‖x − x0‖² (0-d tensors only)."""
        S = self.S
        first = S["t"][seg] == 0
        rbar = torch.where(first, group["reps_rel"] * (1.0 + S["x0_norm"][seg]),
                           torch.maximum(S["rbar"][seg], dist_sq.sqrt()))
        G = torch.where(first, grad_sq + group["eps"], S["G"][seg] + grad_sq)
        eta = R.safe_div(group["lr"] * rbar, G.sqrt())
        if group["init_eta"] is not None:
            eta = torch.where(first, torch.full_like(eta, group["init_eta"]), eta)
        return {"rbar": rbar, "G": G, "eta": eta, "t": S["t"][seg] + 1}

    def _update(self, batch: StepBatch) -> None:
        self._anchor_all(batch)
        S, ok = self.S, batch.ok
        # Per segment: ‖g + λx‖² and ‖x − x0‖² over the segment (the distance includes parameters of the
        # segment that have no gradient this step but moved earlier).
        grad_parts: dict[int, list] = {}
        dist_parts: dict[int, list] = {}
        seg_group: dict[int, dict] = {}
        decayed = []
        for i, it in enumerate(batch.items):
            seg = self._segment(it.group_index, it.flat_index)
            seg_group[seg] = it.group
            wd = it.group["weight_decay"]
            if wd != 0:
                g = R.axpy(R.up(it.g, it.p), R.up(it.p, it.p), wd)
                grad_parts.setdefault(seg, []).append(R.sumsq(g))
            else:
                g = it.g
                grad_parts.setdefault(seg, []).append(batch.grad_sq[i])
            decayed.append(g)
        flat = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                seg = self._segment(gi, flat)
                if seg in grad_parts and "x0" in self.state.get(p, {}):
                    dist_parts.setdefault(seg, []).append(R.sumsq(R.up(p, p) - R.up(self.state[p]["x0"], p)))
                flat += 1

        etas = {}
        for seg, parts in grad_parts.items():
            new = self._rule(seg, seg_group[seg], batch.total(parts), batch.total(dist_parts.get(seg, [])))
            for name, value in new.items():
                self._set(name, value, ok, seg)
            etas[seg] = new["eta"]
        coeffs = [etas[self._segment(it.group_index, it.flat_index)] for it in batch.items]
        R.sgd_apply_(batch.items, coeffs, ok, direction=decayed)
        S["steps"].add_(ok.to(torch.float64))


class LDoG(DoG):
    """Layer-wise DoG: the DoG rule with one step size per parameter tensor."""

    per_tensor = True
