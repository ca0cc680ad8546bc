"""``FusedOptimizer``: the ``torch.optim.Optimizer`` every lrfree method derives from.

One step is always the same pipeline (see ARCHITECTURE §1)::

    gather grads ─► stats (per-tensor fp64 partials) ─► scalar rule (0-d fp64 device tensors)
                 ─► apply (element-wise update, committed only if the step is accepted)

This module owns everything that is not a method's math: param groups and their validation, lazy
state, the device-resident scalar store, the non-finite guard, ``scalars()`` and backend selection.
Checkpoints (``state_dict``, ``load_state_dict``, copy and pickle) are in :mod:`lrfree.state_dict`.
Nothing in :meth:`FusedOptimizer.step` reads a device value on the host, so a step never synchronizes
and can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from . import precision
from . import validation as V
from .backends import resolve_backend, validate_backend
from .backends import torch_ref as R
from .distributed import DTensor, layout_for, local_real
from .state_dict import Checkpointing

__all__ = ["FusedOptimizer", "StepBatch", "Item"]

# Domains a scalar of the store can live on (ALGORITHMS §0): one value for the whole optimizer, one per
# param group, or one per parameter tensor (indexed by the tensor's position across all groups).
GLOBAL, GROUP, TENSOR = "global", "group", "tensor"


@dataclass(slots=True)
class Item:
    """One parameter that has a gradient in this step."""

    p: torch.Tensor  # what the step updates: the parameter, its local shard, or its fp32 master copy
    g: torch.Tensor
    group: dict
    group_index: int
    flat_index: int  # position of p among all params of all groups; indexes TENSOR-domain scalars
    state: dict
    param: torch.Tensor  # the parameter itself, as listed in its param group


class StepInputs:
    """A step's loss and accept flag, shared by a batch and its subsets.

    Single-process, both are known when the step starts. Under data parallelism (``distributed``) the
    local loss and non-finite witness wait in ``pending`` and are made global by the step's first
    collective, so they cost no collective of their own.
    """

    def __init__(self, loss: torch.Tensor | None, ok: torch.Tensor | None, pending: list | None = None):
        self.loss, self.ok, self.pending = loss, ok, pending


@dataclass
class StepBatch:
    """What a method's update sees: the active parameters and the per-step inputs, all on device."""

    items: list[Item]
    inputs: StepInputs
    device: torch.device
    optimizer: "FusedOptimizer"
    sr_base: torch.Tensor | None = None  # 0-d int64 step seed under stochastic rounding (params or state), else None
    found_inf: torch.Tensor | None = None  # GradScaler's flag, as it handed it over (rule kernels read it)
    ok_i32: torch.Tensor | None = None  # the accept flag a rule kernel wrote (int32), for the apply pass

    @property
    def rule_kernel(self) -> bool:
        """Whether the method's scalar rule, the accept decision and the counters run as the method's
        one-program rule kernel (``lrfree.kernels.scalar_math``) instead of 0-d torch ops: on a fused
        backend, in a single process (data-parallel steps run the same rule in torch between their
        collectives), for a method that has one."""
        opt = self.optimizer
        return self.fused and opt._layout is None and opt._has_rule_kernel()

    @functools.cached_property
    def sr_seeds(self) -> torch.Tensor | None:
        """(len(items),) int64: every tensor's stochastic-rounding seed for this step (None: round to nearest)."""
        if self.sr_base is None:
            return None
        return R.tensor_seed(self.sr_base, self.index(it.flat_index for it in self.items))

    @property
    def loss(self) -> torch.Tensor | None:
        """0-d fp64 (averaged over data-parallel ranks), or None when the caller gave no loss."""
        self._settle()
        return self.inputs.loss

    @property
    def ok(self) -> torch.Tensor:
        """0-d bool: False when the loss or a gradient (on any rank) is non-finite, or GradScaler found inf."""
        self._settle()
        return self.inputs.ok

    def _settle(self) -> None:
        if self.inputs.pending is not None:
            self.sync()

    def sync(self, *partials: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The given local fp64 partials (per-tensor rows or sums over this rank's elements) as global
        values: one SUM all-reduce over the shards, which also settles the step's loss and accept flag
        if no collective has yet. Single-process, and for replicated (DDP) parameters, whose statistics
        are global already, the partials come back unchanged."""
        layout = self.optimizer._layout
        pending = self.inputs.pending
        if layout is None or (pending is None and not layout.sharded):
            return partials
        parts = list(pending or ()) + (list(partials) if layout.sharded else [])
        if not parts:
            return partials
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in parts])
        layout.all_reduce_sum_(flat)
        out = list(flat.split([t.numel() for t in parts]))
        if pending is not None:
            self.inputs.pending = None
            self._finish_inputs(*out[:len(pending)], world_size=layout.world_size)
            out = out[len(pending):]
        if not layout.sharded:
            return partials
        return tuple(v.view(t.shape) for v, t in zip(out, partials))

    def _finish_inputs(self, rejections: torch.Tensor, *loss: torch.Tensor, world_size: int) -> None:
        """rejections = number of ranks that found a non-finite gradient (or GradScaler's found-inf);
        loss = Σ of the ranks' losses."""
        inputs = self.inputs
        inputs.loss = (loss[0][0] if world_size == 1 else loss[0][0] / world_size) if loss else None
        ok = rejections[0] == 0
        if self.optimizer.skip_nonfinite and inputs.loss is not None:
            ok = ok & torch.isfinite(inputs.loss)
        inputs.ok = ok

    def sync_max(self, partials: torch.Tensor) -> torch.Tensor:
        """Elementwise max of ``partials`` over the shards (one MAX all-reduce when sharded)."""
        layout = self.optimizer._layout
        if layout is None or not layout.sharded:
            return partials
        flat = partials.reshape(-1).to(torch.float64).clone()
        layout.all_reduce_max_(flat)
        return flat.view(partials.shape)

    @property
    def fused(self) -> bool:
        return self.optimizer._backend in ("triton", "cuda")

    @functools.cached_property
    def local_grad_sq(self) -> torch.Tensor:
        """(len(items),) fp64: Σg² per tensor over this rank's elements, reduced once and only if the
        guard or the method needs it."""
        if self.fused:
            from lrfree.kernels import common
            return common.grad_sq(self)
        return R.per_item(self, lambda c: c.sumsq(c.grads))

    @functools.cached_property
    def grad_sq(self) -> torch.Tensor:
        """(len(items),) fp64: Σg² per tensor (over every shard)."""
        return self.sync(self.local_grad_sq)[0]

    def grad_sq_until(self, known: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """0-d fp64 Σg² over the batch (every shard), for a statistic needed only until the 0-d device
        flag ``known`` is true (D-Adapt SGD's ‖g0‖): :meth:`reduce` of :attr:`grad_sq` when the step has
        it anyway (the guard's pass) or runs the reference; else a small persistent launch that reads the
        gradients only while ``known`` is false and gives 0 after (``kernels.common.until_known``).
        ``weights`` (one fp64 value per tensor, or None) weights each tensor's Σg² (per-group lr ratios)."""
        if not self.fused or "local_grad_sq" in self.__dict__:
            return self.reduce(self.grad_sq if weights is None else weights * self.grad_sq)
        from lrfree.kernels import common
        return self.reduce(self.sync(common.grad_sq_until(self, known, weights))[0])

    def reduce(self, values: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """``start`` plus a vector of per-tensor fp64 partials: left to right in the reference (the order
        in which the reference packages accumulate), in one deterministic reduction when fused."""
        if self.fused:
            return values.sum() if start is None else start + values.sum()
        if self.device.type == "cpu":  # as total(values.unbind(), start), in one op
            first = torch.zeros((), dtype=torch.float64, device=self.device) if start is None else start
            return _left_to_right(torch.cat([first.reshape(1).to(torch.float64), values]))
        return self.total(values.unbind(), start)

    def reduce_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(K,) column sums of an (items, K) matrix of per-tensor partials, in :meth:`reduce`'s order."""
        if self.fused:
            return rows.sum(0)
        if self.device.type == "cpu" and len(rows):  # as total(rows.unbind(0)), in one op
            return _left_to_right(torch.cat([rows.new_zeros((1, *rows.shape[1:])), rows]))
        return self.total(rows.unbind(0))

    def subset(self, keep: list[int]) -> "StepBatch":
        """The same step restricted to some of its tensors (e.g. the groups with lr > 0)."""
        if len(keep) == len(self.items):
            return self
        sub = StepBatch([self.items[i] for i in keep], self.inputs, self.device, self.optimizer, self.sr_base,
                        self.found_inf)
        for name in ("local_grad_sq", "grad_sq", "sr_seeds"):
            if self.__dict__.get(name) is not None:
                sub.__dict__[name] = self.__dict__[name].index_select(0, self.index(keep))
        return sub

    def vector(self, values: Iterable[float]) -> torch.Tensor:
        """A cached fp64 device vector of per-item coefficients (a group's lr, eps, weight decay ...)."""
        return self.optimizer._coefficient_vector(tuple(values))

    def index(self, values: Iterable[int]) -> torch.Tensor:
        """A cached int64 device vector (positions of tensors or segments)."""
        return self.optimizer._coefficient_vector(tuple(int(v) for v in values), torch.long)

    def per_item(self, key: str) -> torch.Tensor:
        """The param-group hyperparameter ``key`` of every active tensor, as a device vector."""
        return self.vector(float(it.group[key]) for it in self.items)

    def total(self, values: Iterable[torch.Tensor], start: torch.Tensor | None = None) -> torch.Tensor:
        """``start`` plus the 0-d partials, in fp64, left to right: deterministic, and the order in
        which the reference implementations accumulate their per-tensor ``.item()`` values."""
        out = torch.zeros((), dtype=torch.float64, device=self.device) if start is None else start
        values = list(values)
        if self.device.type == "cpu" and values:
            # one sequential cumsum is the same chain of fp64 additions as the loop below, without a
            # dispatch per term (CPU cumsum accumulates left to right; a GPU scan would reassociate)
            return _left_to_right(torch.stack([out.to(torch.float64), *values]))
        for v in values:
            out = out + v
        return out


def _left_to_right(terms: torch.Tensor) -> torch.Tensor:
    """terms[0] + terms[1] + ... (along dim 0) as the chain ((t0 + t1) + t2) + ..., on the CPU."""
    return terms.cumsum(0)[-1] if len(terms) > 1 else terms[0]


def _real_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class FusedOptimizer(Checkpointing, torch.optim.Optimizer):
    """Base class: param groups, lazy state, scalar store, non-finite guard and backend dispatch.

    Subclasses provide

    * ``hyperparameters``: ``{name: validation.Check}`` applied to every param group;
    * ``shared_hyperparameters``: names that must be equal in every group (global step-size rules);
    * ``requires_loss``: True for Polyak-type methods, which need ``step(loss=...)``;
    * :meth:`init_state` (per-tensor state), :meth:`initial_scalars` (and the group/tensor variants);
    * :meth:`_update`, the method's stats → rule → apply on a :class:`StepBatch`.
    """

    hyperparameters: ClassVar[Mapping[str, V.Check]] = {}
    # torch.amp.GradScaler hands over the loss scale and its found-inf flag as device tensors
    # (``self.grad_scale``, ``self.found_inf``) instead of reading the flag back on the host: the step
    # unscales the gradients and folds the flag into its own skip decision, so no step synchronizes.
    _step_supports_amp_scaling: ClassVar[bool] = True
    shared_hyperparameters: ClassVar[tuple[str, ...]] = ()
    requires_loss: ClassVar[bool] = False
    #: the method's fused passes include a rule kernel (see StepBatch.rule_kernel)
    fused_rule: ClassVar[bool] = False
    #: the per-element statistics ``state_dtype`` stores (see lrfree.precision); anchors such as x0 are not
    low_precision_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Any, defaults: dict, *, backend: str = "auto", skip_nonfinite: bool = True,
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 state_dtype: torch.dtype | None = None, process_group: Any = None, sharded: bool | None = None):
        owner = type(self).__name__
        # the dtype the method's per-element statistics are stored in (lrfree.precision)
        self.state_dtype = precision.validate(owner, state_dtype)
        V.BOOL(owner, "skip_nonfinite", skip_nonfinite)
        V.BOOL(owner, "master_weights", master_weights)
        V.BOOL(owner, "stochastic_rounding", stochastic_rounding)
        if master_weights and stochastic_rounding:
            raise ValueError(f"{owner}: master_weights and stochastic_rounding are two answers to the same "
                             "problem (updates below bf16's resolution); choose one")
        # bf16 parameters are stored from the fp32 update by stochastic rounding (lrfree.kernels.rounding)
        self.stochastic_rounding = stochastic_rounding
        # bf16/fp16 parameters step an fp32 master copy (state "master"), which is rounded into the parameter
        # after every step: updates smaller than the parameter's rounding step are kept, not lost.
        self.master_weights = master_weights
        self._master_grads: dict[torch.Tensor, torch.Tensor] = {}
        self._requested_backend = validate_backend(backend, type(self).__name__)
        self.skip_nonfinite = skip_nonfinite
        self._vectors: dict[tuple, torch.Tensor] = {}
        self._scalar_store: dict[str, torch.Tensor] = {}
        self._scalar_domain: dict[str, str] = {}
        self._store_shape = (0, 0)  # (groups, params) the store was sized for
        self._device: torch.device | None = None
        # Σ of the losses handed to accumulate_loss since the last step (0-d fp64 on device), or None
        self._accumulated_loss: torch.Tensor | None = None
        V.validate_group(type(self).__name__, None, defaults, self.hyperparameters)
        super().__init__(params, defaults)
        self._backend = resolve_backend(self._requested_backend, type(self).__name__, self.device, self.kernels)
        # data parallelism (see lrfree.distributed): None single-process, else replicated (DDP) or sharded
        self._layout = layout_for(type(self).__name__, (p for _, _, p in self._flat_params()), process_group, sharded)

    # ------------------------------------------------------------------ groups and validation
    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        owner = type(self).__name__
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_hyperparameters(owner, index, group, self.param_groups[0])
            expected = self._device if self._device is not None else (
                group["params"][0].device if group["params"] else None)
            for j, p in enumerate(group["params"]):
                V.validate_param(owner, group, index, j, p)
                if self.stochastic_rounding and V.real_dtype(p) == torch.float16:
                    dtype = str(p.dtype).removeprefix("torch.")
                    raise ValueError(f"{owner}: {V.param_label(group, index, j, p)} is {dtype}; "
                                     "stochastic_rounding rounds bfloat16 parameters (fp32/fp64 ones are "
                                     "unaffected); use master_weights=True for float16")
                if p.device != expected:
                    raise ValueError(
                        f"{owner}: {V.param_label(group, index, j, p)} is on {p.device} but other "
                        f"parameters are on {expected}; an lrfree optimizer keeps its step scalars on "
                        "one device, so all its parameters must live there")
            if group["params"] and self._device is None:
                self._device = group["params"][0].device
        except Exception:
            self.param_groups.pop()
            raise

    def _validate_hyperparameters(self, owner: str, index: int, group: Mapping, first: Mapping) -> None:
        V.validate_group(owner, index, group, self.hyperparameters)
        def canonical(value):  # betas given as a list in one group and a tuple in another are the same
            return tuple(value) if isinstance(value, list) else value

        for name in self.shared_hyperparameters:
            if canonical(group[name]) != canonical(first[name]):
                raise ValueError(
                    f"{owner} param_groups[{index}]: {name}={group[name]!r} differs from param_groups[0] "
                    f"({first[name]!r}); {name} is a property of the whole optimizer and must be the same "
                    "in every group")

    # ------------------------------------------------------------------ hooks for subclasses
    def init_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """Per-tensor state, created the first time ``p`` has a gradient."""
        return {}

    def initial_scalars(self) -> dict[str, float]:
        """Global scalar state (fp64 on device) and its initial values."""
        return {}

    def initial_group_scalars(self, group: dict) -> dict[str, float]:
        """Scalar state with one value per param group."""
        return {}

    def initial_tensor_scalars(self, group: dict, p: torch.Tensor) -> dict[str, float]:
        """Scalar state with one value per parameter tensor."""
        return {}

    def _update(self, batch: StepBatch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def rule_group(self, group: dict | None = None) -> dict:
        """The param group whose hyperparameters drive the method's global rule (betas, growth rate, ...):
        group 0, as in the reference implementations. ``group`` is the group asking (for its state)."""
        return self.param_groups[0]

    def _finite_witness(self, batch: StepBatch) -> torch.Tensor:
        """A 0-d tensor that is finite exactly when every gradient element is: Σg² in fp64 by default.
        A method whose first pass reads every gradient anyway may return its own statistic instead
        and save the guard's pass."""
        return batch.local_grad_sq.sum()

    # ------------------------------------------------------------------ dtype policy
    @staticmethod
    def zeros_state(p: torch.Tensor) -> torch.Tensor:
        """A zero state tensor like ``p`` in the default state dtype (``state_dtype`` is applied to the
        whole new state afterwards, by lrfree.precision)."""
        return torch.zeros_like(p, dtype=precision.default_dtype(p), memory_format=torch.preserve_format)

    @staticmethod
    def copy_of(p: torch.Tensor) -> torch.Tensor:
        """A copy of the parameter in its own dtype (exact: used for x0-style anchors)."""
        return p.detach().clone(memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ the scalar store
    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def _flat_params(self) -> list[tuple[int, dict, torch.Tensor]]:
        return [(gi, g, p) for gi, g in enumerate(self.param_groups) for p in g["params"]]

    def _sync_store(self) -> None:
        """Create the scalar store on first use, and extend per-group / per-tensor vectors when
        ``add_param_group`` has appended groups since (groups are only ever appended)."""
        flat = self._flat_params()
        shape = (len(self.param_groups), len(flat))
        if shape == self._store_shape and self._scalar_store:
            return
        f64 = dict(dtype=torch.float64, device=self.device)
        store, domain = self._scalar_store, self._scalar_domain
        if not store:
            rounds = self.stochastic_rounding or precision.rounds_state(self)
            counters = {"steps": 0.0, "skipped": 0.0, **({"rounding_step": 0.0} if rounds else {})}
            for name, value in {**counters, **self.initial_scalars()}.items():
                store[name] = torch.full((), float(value), **f64)
                domain[name] = GLOBAL
        n_groups, n_params = self._store_shape
        new_groups = [self.initial_group_scalars(g) for g in self.param_groups[n_groups:]]
        new_tensors = [self.initial_tensor_scalars(g, p) for _, g, p in flat[n_params:]]
        for rows, dom in ((new_groups, GROUP), (new_tensors, TENSOR)):
            if not rows:
                continue
            for name in rows[0]:
                tail = torch.tensor([float(r[name]) for r in rows], **f64)
                store[name] = torch.cat([store[name], tail]) if name in store else tail
                domain[name] = dom
        self._store_shape = shape

    @property
    def S(self) -> dict[str, torch.Tensor]:
        """The live scalar store (fp64 device tensors), or the view of it a method is stepping with (see
        DAdaptBase's per-group d). Methods update it only through :meth:`_set`."""
        view = getattr(self, "_scalar_view", None)
        return self._scalar_store if view is None else view

    def _set(self, name: str, value: torch.Tensor | float, ok: torch.Tensor, index: int | slice | None = None) -> None:
        """Write a new scalar value in place, only if the step is accepted.

        In-place writes keep the tensor's storage fixed, which is what CUDA-graph replay needs.
        """
        dst = self.S[name] if index is None else self.S[name][index]
        value = value.to(torch.float64) if isinstance(value, torch.Tensor) else torch.full_like(dst, value)
        dst.copy_(torch.where(ok, value, dst))

    def _set_all(self, values: dict[str, torch.Tensor], ok: torch.Tensor) -> None:
        """:meth:`_set` for several scalars at once: ``S[name] ← value`` for each, only if the step is
        accepted, in four ops whatever their number (three per scalar one by one: on a CPU ~10 µs each)."""
        if len(values) == 1:
            (name, value), = values.items()
            return self._set(name, value, ok)
        dsts = [self.S[name] for name in values]
        new = torch.cat([v.reshape(-1).to(torch.float64) for v in values.values()])
        old = torch.cat([d.reshape(-1) for d in dsts])
        kept = torch.where(ok, new, old).split([d.numel() for d in dsts])
        torch._foreach_copy_(dsts, [k.view(d.shape) for k, d in zip(kept, dsts)])

    def _set_at(self, name: str, index: torch.Tensor, values: torch.Tensor, ok: torch.Tensor) -> None:
        """``store[name][index] = values`` (a per-group or per-tensor vector), only if the step is accepted."""
        dst = self._scalar_store[name]
        values = values.to(torch.float64)
        dst.index_copy_(0, index, torch.where(ok, values, dst.index_select(0, index)))

    def scalars(self) -> dict[str, torch.Tensor]:
        """The method's live step scalars (``d``, step size, skip counter, ...) as device tensors.

        Reading them does not synchronize; call ``.item()`` yourself outside the hot loop to log.
        Global scalars are 0-d; per-group ones have one entry per param group, per-tensor ones one
        entry per parameter (in param-group order).
        """
        self._sync_store()
        return {k: v.detach().clone() for k, v in self._scalar_store.items()}

    # ------------------------------------------------------------------ step
    def _loss_tensor(self, loss: Any, from_closure: bool = False, where: str = "step") -> torch.Tensor | None:
        """The step's loss as a 0-d fp64 device tensor (None: no loss).

        A method that reads the loss (``requires_loss``) needs one real value: a number, or a 1-element
        tensor of any shape. The others only check it for finiteness, so they take a tensor of any shape
        (its 0-d stand-in is NaN where any element is non-finite), and ignore whatever else a closure
        returns, as torch's optimizers do. ``where`` names the method that received it in errors.
        """
        owner = type(self).__name__
        if loss is None:
            if self.requires_loss:
                raise ValueError(
                    f"{owner} sets its step size from the loss value: call step(loss=loss) with the "
                    "0-d loss tensor whose gradient was just computed, step(closure), or hand each "
                    "micro-batch's loss to accumulate_loss(loss) before a step() without arguments")
            return None
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            readable = loss.is_floating_point() or loss.dtype in (torch.int32, torch.int64)
            if loss.numel() == 1 and readable:
                return loss.reshape(()).to(device=self.device, dtype=torch.float64)
            if not self.requires_loss:
                finite = torch.isfinite(loss).all().to(self.device)
                return torch.where(finite, 0.0, torch.nan).to(torch.float64)
            if not readable:
                raise TypeError(f"{owner}.{where}: loss must be a real floating-point tensor, got {loss.dtype}")
            raise ValueError(f"{owner}.{where}: loss must be a 0-d tensor (or any 1-element tensor) or a number, "
                             f"got a tensor of shape {tuple(loss.shape)} (reduce it with .mean() or .sum() first)")
        if _real_scalar(loss):
            return torch.full((), float(loss), dtype=torch.float64, device=self.device)
        if from_closure and not self.requires_loss:
            return None
        raise TypeError(f"{owner}.{where}: loss must be a 0-d tensor or a real number, got {type(loss).__name__}")

    def _gather(self) -> list[Item]:
        owner = type(self).__name__
        items: list[Item] = []
        flat_index = 0
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        raise TypeError(f"{owner}: {V.param_label(group, gi, j, p)} has a sparse gradient; "
                                        "lrfree optimizers need dense gradients")
                    if g.shape != p.shape or g.device != p.device:
                        raise ValueError(f"{owner}: the gradient of {V.param_label(group, gi, j, p)} has shape "
                                         f"{tuple(g.shape)} on {g.device}; it must match the parameter")
                    state = self.state.get(p)
                    if not state:
                        state = self._new_state(p, group)
                        if state:  # stateless methods leave optimizer.state empty, like torch's SGD
                            self.state[p] = state
                    if "master" in state:  # the method steps the fp32 master with an fp32 copy of the gradient
                        buf = self._master_grads.get(p)
                        if buf is None or buf.shape != state["master"].shape:
                            buf = self._master_grads[p] = torch.empty_like(state["master"])
                        buf.copy_(local_real(g))
                        items.append(Item(state["master"], buf, group, gi, flat_index, state, p))
                    elif not isinstance(p, DTensor) and not p.is_complex():  # the usual case: p and g themselves
                        items.append(Item(p, g, group, gi, flat_index, state, p))
                    else:  # a sharded (DTensor) parameter steps its local shard, a complex one its real view
                        items.append(Item(local_real(p), local_real(g), group, gi, flat_index, state, p))
                flat_index += 1
        return items

    def _new_state(self, p: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
        """A parameter's initial state: the method's, plus the fp32 master copy under ``master_weights``
        (the method's state is then initialized from the master, so anchors such as x0 are fp32 too).
        A sharded (DTensor) parameter's state covers its local shard, a complex one's its real view."""
        p = local_real(p)
        if self.master_weights and p.dtype in (torch.bfloat16, torch.float16):
            master = p.detach().to(torch.float32, memory_format=torch.preserve_format)
            return {**precision.store(self, self.init_state(master, group)), "master": master}
        return precision.store(self, self.init_state(p, group))

    def _stepped(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the steps of parameter ``p`` update: its fp32 master, its local shard, or ``p``."""
        state = self.state.get(p)
        return state["master"] if state and "master" in state else local_real(p)

    def _round_masters_into_params(self) -> None:
        params, masters = [], []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if p.grad is not None and state and "master" in state:
                    params.append(local_real(p))
                    masters.append(state["master"])
        if params:
            torch._foreach_copy_(params, masters)

    def accumulate_loss(self, loss: Any) -> None:
        """Add a micro-batch's loss to the loss of the next :meth:`step` (gradient accumulation).

        The step after one or more calls takes as its loss the **sum** of the losses handed in since the
        previous step. Training stacks that accumulate gradients divide each micro-batch's loss by the
        number of micro-batches k before its backward (Lightning's ``accumulate_grad_batches``, the
        Hugging Face Trainer's ``gradient_accumulation_steps``); handing in those divided losses makes
        the sum the mean loss of the accumulated batch, the loss whose gradient is in ``.grad``. Hand
        in undivided losses only if the gradients are summed, not averaged.

        ``loss`` is what :meth:`step` accepts as ``loss=``: a 0-d (or 1-element) tensor or a number. It
        is detached and added on its device in fp64, so nothing is read back to the host. Every
        :meth:`step` clears the sum, whether the step is taken or skipped (non-finite values); a step
        that never reaches the optimizer (GradScaler skipping on the host) does not, see
        :meth:`reset_accumulated_loss`. The sum is not part of ``state_dict()``: checkpoints are written
        between steps, where it is empty.
        """
        if loss is None:
            raise ValueError(f"{type(self).__name__}.accumulate_loss: loss is None; pass the micro-batch's "
                             "loss tensor (or number)")
        value = self._loss_tensor(loss, where="accumulate_loss")
        if value is None:  # cannot happen for a tensor or a number, which _loss_tensor always converts
            return
        total = self.accumulated_loss
        # a copy, not an alias of the caller's tensor, which the next micro-batch may overwrite in place
        self._accumulated_loss = value.clone() if total is None else total + value

    @property
    def accumulated_loss(self) -> torch.Tensor | None:
        """The sum :meth:`accumulate_loss` has gathered for the next step (0-d fp64 on device), or None (also
        for an optimizer pickled before the sum existed, hence getattr)."""
        return getattr(self, "_accumulated_loss", None)

    def reset_accumulated_loss(self) -> None:
        """Forget the losses handed to :meth:`accumulate_loss` since the last step. :meth:`step` does this
        itself; call it where a step was skipped without reaching the optimizer (``GradScaler`` reading
        an overflow on the host) before a new accumulation window starts."""
        self._accumulated_loss = None

    # Inside a torch.compile'd training step the optimizer step runs eagerly, as one opaque call: it is
    # fused kernels already, and tracing its Python (lazy state, caches) would guard on optimizer state and
    # on lr values, recompiling whenever they change.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, loss: Any = None) -> Any:
        """Perform one optimization step.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            loss: the loss whose gradient is in ``.grad``, as a 0-d (or any 1-element) tensor, kept on
                device, or a number. Required by Polyak-type methods; for the others it is only checked
                for finiteness, and may have any shape.

        The step's loss is, in this order: ``loss``; else the sum gathered by :meth:`accumulate_loss`
        since the last step (hooks that accumulate also see the micro-batch a closure runs, so the
        closure's own value is not added again); else what the closure returned. A closure that returns
        None together with ``loss`` is how training stacks wrap a manual ``step(loss=...)`` (Lightning's
        manual optimization), and is accepted; ``loss`` together with a closure that returns a value, or
        with an accumulated sum, is two different losses and raises ``ValueError`` (after the closure
        ran, before anything is updated).

        Returns what the closure returned (else ``loss``), as torch's optimizers do. A non-finite loss or
        gradient skips the step on device: parameters and optimizer state stay bit-identical and
        ``scalars()['skipped']`` counts it. The step ``torch.distributed.checkpoint`` takes to create a
        fresh optimizer's state (zero gradients, every lr 0, no loss) creates it and changes nothing else
        (see :meth:`_is_state_init_call`).
        """
        owner = type(self).__name__
        returned = None
        if closure is None and loss is None and self.accumulated_loss is None and self._is_state_init_call():
            self._gather()  # creates the lazy state of every parameter that has a gradient
            self._sync_store()
            return None
        if closure is not None:
            with torch.enable_grad():
                returned = closure()
        # read after the closure: Lightning's accumulation hooks run inside it, for the last micro-batch
        accumulated = self.accumulated_loss
        self._accumulated_loss = None  # consumed by this step, taken or skipped
        if loss is not None:
            if returned is not None:
                raise ValueError(f"{owner}.step: the closure returned a loss and loss= was given too; pass one "
                                 "(a closure used only for its side effects must return None)")
            if accumulated is not None:
                raise ValueError(f"{owner}.step: loss= was given while accumulate_loss() had gathered a loss "
                                 "for this step; use one of the two")
            loss_t = self._loss_tensor(loss)
        elif accumulated is not None:
            loss_t = accumulated
        else:
            loss_t = self._loss_tensor(returned, from_closure=closure is not None)
        with self._lr_as_floats():
            self._step(loss_t)
        return returned if closure is not None and returned is not None else loss

    def _is_state_init_call(self) -> bool:
        """Whether this ``step()`` only asks for the optimizer's state to exist: no state yet, no loss,
        every parameter that needs one has a gradient and every group's ``lr`` is 0. That is how
        ``torch.distributed.checkpoint.state_dict`` (``get_state_dict`` / ``set_state_dict``) prepares a
        fresh optimizer, with zero gradients. Such a step creates the lazy state and the scalar store and
        changes nothing else: a real step would count itself, move lrfree's step scalars (lr scales the
        step, not every statistic), need a loss (Polyak-type methods) or reject lr=0 (DoG). Only host
        values are read: a tensor ``lr`` off the CPU is taken as non-zero rather than synchronized. A
        method that keeps no per-parameter state (SPS, ClippedSGD without momentum ...) never has state, so
        any step of it with every lr at 0 and no loss is such a step: it moves no parameter either way."""
        if self.state:
            return False
        groups = self.param_groups
        if not groups or not all("lr" in g for g in groups):
            return False
        for g in groups:
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device.type != "cpu" or lr.numel() != 1 or float(lr) != 0:  # CPU: no sync
                    return False
            elif lr != 0:
                return False
        params = [p for g in groups for p in g["params"]]
        return bool(params) and all(p.grad is not None for p in params if p.requires_grad)

    @contextlib.contextmanager
    def _lr_as_floats(self):
        """A tensor ``lr`` (see validation.lr_value) is read once per step and seen as a float by the
        method's code for the step's duration; the group keeps the user's tensor."""
        tensors = {}
        for i, group in enumerate(self.param_groups):
            if isinstance(group.get("lr"), torch.Tensor):
                tensors[i] = group["lr"]
                where = f"{type(self).__name__} param_groups[{i}]"
                value = V.lr_value(where, tensors[i])
                self.hyperparameters["lr"](where, "lr", value)
                group["lr"] = value
        try:
            yield
        finally:
            for i, lr in tensors.items():
                self.param_groups[i]["lr"] = lr

    def _step(self, loss_t: torch.Tensor | None) -> None:
        items = self._gather()
        if items:
            self._unscale_for_grad_scaler(items)
        if not items:
            return
        self._sync_store()
        if self._backend == "cuda":  # the fused passes' launches run the extension's kernels
            from lrfree.kernels.multi_tensor import kernel_target
            token = kernel_target.set(self._cuda_launcher())
            try:
                self._fused_step(items, loss_t)
            finally:
                kernel_target.reset(token)
        else:
            self._fused_step(items, loss_t)
        if self.master_weights:
            self._round_masters_into_params()

    def _unscale_for_grad_scaler(self, items: list[Item]) -> None:
        """Divide the gradients by GradScaler's scale on the device (None once the user unscaled them)."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return
        inv_scale = scale.double().reciprocal().float().to(self.device)
        unused_flag = torch.zeros((), dtype=torch.float32, device=self.device)  # GradScaler checked already
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for it in items:
            by_dtype.setdefault(it.g.dtype, []).append(it.g)
        for grads in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, unused_flag, inv_scale)

    def _fused_step(self, items: list[Item], loss_t: torch.Tensor | None) -> None:
        batch = StepBatch(items=items, inputs=StepInputs(loss_t, None), device=self.device, optimizer=self)
        counter = self._scalar_store.get("rounding_step")  # stochastic rounding of parameters or state
        if counter is not None:  # every step draws new bits, taken or skipped
            if batch.fused:  # the seeds and the counter's advance in one launch
                from lrfree.kernels.rounding import tensor_seeds
                batch.__dict__["sr_seeds"] = tensor_seeds(batch, counter)
            else:
                batch.sr_base = R.step_seed(counter)
                counter.add_(1.0)
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler.step
        if batch.rule_kernel:  # the rule kernel decides, counts and updates the store in one launch
            batch.found_inf = None if found_inf is None else found_inf.to(device=self.device)
            self._update(batch)
            return
        layout = self._layout
        if layout is None:  # single process: the accept flag at once, in as few ops as it takes
            ok = None
            if self.skip_nonfinite:
                ok = torch.isfinite(self._finite_witness(batch))
                if loss_t is not None:
                    ok = ok & torch.isfinite(loss_t)
            if found_inf is not None:
                fine = found_inf.to(device=self.device) == 0
                ok = fine if ok is None else ok & fine
            batch.inputs.ok = torch.ones((), dtype=torch.bool, device=self.device) if ok is None else ok
            self._update(batch)
            self._scalar_store["skipped"].add_(batch.ok.logical_not())
            return
        found_inf = None if found_inf is None else found_inf.to(device=self.device, dtype=torch.float64)
        # whether this rank rejects the step, and its loss; data parallel, they join the step's first collective
        rejects = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.skip_nonfinite:
            rejects = (~torch.isfinite(self._finite_witness(batch))).to(torch.float64)
        if found_inf is not None:
            rejects = rejects + (found_inf != 0).to(torch.float64)
        inputs = [rejects.reshape(1)] + ([loss_t.reshape(1)] if loss_t is not None else [])
        if layout.sharded or loss_t is not None:
            batch.inputs.pending = inputs
        else:  # the other ranks (if any) decide the same from the same all-reduced gradients
            batch._finish_inputs(*inputs, world_size=1)
        self._update(batch)
        self._scalar_store["skipped"].add_((~batch.ok).to(torch.float64))

    def __repr__(self) -> str:
        return super().__repr__().replace(type(self).__name__ + " (", f"{type(self).__name__} [backend={self.backend}] (", 1)

    @property
    def backend(self) -> str:
        """The backend that runs the steps: ``"torch"``, ``"triton"`` or ``"cuda"`` (``"auto"`` resolved)."""
        return self._backend

    # ------------------------------------------------------------------ passes and their backends
    #: the module of ``lrfree.kernels`` with this method's fused passes
    kernels: ClassVar[str | None] = None

    def _pass(self, name: str) -> Callable:
        """The implementation of pass ``name`` for the active backend: the fused kernel
        ``lrfree.kernels.<kernels>.<name>(optimizer, ...)``, or the torch reference ``self._ref_<name>``."""
        if self._backend in ("triton", "cuda"):
            module = importlib.import_module(f"lrfree.kernels.{self.kernels}")
            return functools.partial(getattr(module, name), self)
        return getattr(self, "_ref_" + name)

    def _cuda_launcher(self):
        launcher = getattr(self, "_launcher", None)
        if launcher is None or launcher.device != self.device:
            from .backends import cuda_ext
            launcher = self._launcher = cuda_ext.launcher(self.device)
        return launcher

    def _has_rule_kernel(self) -> bool:
        """Whether this configuration's fused step uses the method's rule kernel (a method turns it off
        for options that only the torch rule implements)."""
        return self.fused_rule

    def _coefficient_vector(self, values: tuple, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A device vector of host values (per-item hyperparameters, indices), cached by value so a
        step with unchanged hyperparameters copies nothing to the device."""
        key = (values, dtype)
        vec = self._vectors.get(key)
        if vec is None:
            if len(self._vectors) > 256:
                self._vectors.clear()
            host = torch.tensor(values, dtype=dtype)
            vec = host.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else host
            self._vectors[key] = vec
        return vec
