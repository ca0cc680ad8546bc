"""Checkpoints of an lrfree optimizer: ``state_dict`` / ``load_state_dict`` and pickling.

:class:`Checkpointing` is the part of :class:`~lrfree.optimizer.FusedOptimizer` that saves and restores
it. It keeps ``torch.optim.Optimizer``'s contract, hooks included:

* ``state_dict()`` is torch's ``{"state", "param_groups"}`` and nothing else, so that
  ``torch.distributed.checkpoint`` (which keeps only those two) saves all of it. The device-resident step
  scalars (``d``, step counters, ...), which live in no parameter's state, ride inside (format 2): each
  param group's ``"lrfree"`` entry holds the format, the method and the group's scalars (group 0 also the
  optimizer-wide ones), and each parameter's state holds its per-tensor scalars, all as 0-d fp64 tensors.
  Under FSDP2 the per-parameter state tensors are DTensors laid out like their parameter.
  ``register_state_dict_pre_hook`` / ``_post_hook`` run around it, as in torch.
* ``load_state_dict()`` validates everything before it changes anything. It reads format 2, format 1
  (earlier lrfree: a top-level ``"lrfree"`` entry with every scalar), and torch.optim's state dicts. A
  param group saved without a key this optimizer has (a state dict from an older lrfree, or from
  ``torch.optim.Adam`` loaded into ``lrfree.Adam``) gets the constructor's default, as torch's optimizers
  do; a state dict without lrfree's scalars loads when the method loses nothing by it (see
  :meth:`Checkpointing._loaded_scalars`). ``register_load_state_dict_pre_hook`` / ``_post_hook`` run
  around it.
* ``copy.deepcopy`` and pickle keep every attribute (options, backend, layout, scalar store), where
  torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any, ClassVar, Mapping

import torch

from . import validation as V
from .distributed import DTensor

STATE_DICT_FORMAT = 2
SCALARS_KEY = "lrfree"  # the param-group entry with the format, the method and the scalars

# the scalar store's domains (lrfree.optimizer's GLOBAL, GROUP, TENSOR; that module imports this one)
_GLOBAL, _GROUP, _TENSOR = "global", "group", "tensor"

# Step counters every optimizer has; a state dict from another optimizer may lack them without losing
# anything the method's update reads.
_ROUNDING = "rounding_step"
_COUNTERS = frozenset({"steps", "skipped", _ROUNDING})

# torch.optim.Optimizer's hook registries. A copy starts with none, as a copy of a torch optimizer does:
# a hook usually closes over the optimizer it was registered on, and would act on the original.
_HOOK_REGISTRIES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                    "_optimizer_load_state_dict_post_hooks")

# Caches keyed by host values or by tensor identity, rebuilt on first use: a copy starts them empty.
_REBUILT_ON_USE = {"_vectors": dict, "_master_grads": dict, "_chunk_layouts": dict}
_DROPPED_ON_COPY = ("_launcher",)  # the compiled extension's launcher: re-created for the copy's device


class Checkpointing:
    """State dict, load and pickling of a :class:`~lrfree.optimizer.FusedOptimizer` (a mixin: it uses the
    optimizer's param groups, state, scalar store and validation)."""

    #: step scalars every step computes afresh, for logging (no step reads them): a state dict that lacks
    #: them loses nothing
    recomputed_scalars: ClassVar[frozenset[str]] = frozenset()

    # ------------------------------------------------------------------ save
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (``state`` keyed by parameter index, ``param_groups`` with ``params`` as
        indices), with lrfree's step scalars inside it (format 2, see the module's docstring):

        * ``param_groups[i]["lrfree"]``: the format, the method, and the group's scalars (group 0 also
          holds the optimizer-wide ones), as 0-d fp64 tensors;
        * ``state[j]``: the parameter's state tensors, plus its per-tensor scalars as 0-d fp64 tensors
          (``step`` of Adam, as torch's Adam keeps it). Every parameter has an entry, ``{}`` when it has
          nothing, as torch's SGD leaves one.

        For a sharded (FSDP2 / DTensor) parameter each state tensor is a DTensor with the parameter's mesh
        and placements over the local shard the steps update (sharing its storage), so
        ``torch.distributed.checkpoint`` saves every rank's shard and reshards on load.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._sync_store()
        store, domain = self._scalar_store, self._scalar_domain
        index_of: dict[int, int] = {}
        groups = []
        for gi, group in enumerate(self.param_groups):
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index_of.setdefault(id(p), len(index_of)) for p in group["params"]]
            scalars = {name: v[gi].detach().clone() for name, v in store.items() if domain[name] == _GROUP}
            if gi == 0:
                scalars.update({name: v.detach().clone() for name, v in store.items() if domain[name] == _GLOBAL})
            packed[SCALARS_KEY] = {"format": STATE_DICT_FORMAT, "method": type(self).__name__, "scalars": scalars}
            groups.append(packed)
        tensor_names = [name for name in store if domain[name] == _TENSOR]
        state: dict[int, dict[str, Any]] = {}
        for position, (gi, j, group, p) in enumerate(self._labelled_params()):
            entry = {key: self._saved_state_tensor(p, V.param_label(group, gi, j, p), key, value)
                     for key, value in self.state.get(p, {}).items()}
            for name in tensor_names:
                if name in entry:  # a method's state key and its per-tensor scalar would overwrite each other
                    raise RuntimeError(f"{type(self).__name__}: per-tensor scalar {name!r} has the name of a state key")
                entry[name] = store[name][position].detach().clone()
            state[index_of[id(p)]] = entry
        saved = {"state": state, "param_groups": groups}
        for hook in self._optimizer_state_dict_post_hooks.values():
            replaced = hook(self, saved)
            if replaced is not None:
                saved = replaced
        return saved

    def _labelled_params(self) -> list[tuple[int, int, dict, torch.Tensor]]:
        """(group index, index in group, group, parameter), in the scalar store's per-tensor order."""
        return [(gi, j, g, p) for gi, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]

    @staticmethod
    def _saved_state_tensor(p: torch.Tensor, label: str, key: str, value: Any) -> Any:
        """A state tensor as saved: under FSDP2 a DTensor over the local shard it covers. A plain tensor
        would be taken for a replicated one by ``torch.distributed.checkpoint``, which would write one
        rank's shard and load it on every rank."""
        if not isinstance(p, DTensor) or not isinstance(value, torch.Tensor):
            return value
        shard = p.to_local()
        if value.shape != shard.shape:
            # Prodigy with slice_p=1 keeps its "s" and "p0" as the flattened shard: same elements, same order
            if value.dim() == 1 and value.numel() == shard.numel() and not shard.is_complex():
                value = value.view(shard.shape)
            else:
                raise ValueError(f"state[{key!r}] of {label} has shape {tuple(value.shape)}, which is not the "
                                 f"shape of the parameter's local shard {tuple(shard.shape)}: it cannot be saved "
                                 "as a sharded tensor (a Prodigy slice_p > 1 samples each rank's shard, a complex "
                                 "parameter's state is its real view); checkpoint this run with slice_p=1 or "
                                 "without FSDP2")
        return DTensor.from_local(value, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())

    # ------------------------------------------------------------------ load
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict saved by the same method, on any device or backend (or by torch.optim's
        counterpart, or an older lrfree: see the module's docstring).

        Everything is validated before anything is changed: a mismatched or corrupt state dict raises
        ``ValueError`` and leaves the optimizer as it was. State tensors keep lrfree's dtype policy
        (fp32 state for low-precision parameters) rather than being cast to the parameter dtype. A DTensor
        state tensor (``torch.distributed.checkpoint`` loaded it resharded) gives its local shard.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{owner}: expected a dict with 'state' and 'param_groups', got "
                             f"{type(state_dict).__name__}")
        state_dict = dict(state_dict)  # a hook may edit it; the caller's dict stays as it was
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        self._load(owner, state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _format(self, owner: str, state_dict: Mapping[str, Any]) -> tuple[Mapping | None, list[Mapping] | None]:
        """(format 1's top-level "lrfree" entry, format 2's per-group entries); both None for a state dict
        from another optimizer."""
        meta = state_dict.get("lrfree")
        saved_groups = state_dict["param_groups"]
        group_meta = None
        if isinstance(saved_groups, (list, tuple)) and any(
                isinstance(g, Mapping) and SCALARS_KEY in g for g in saved_groups):
            group_meta = [g.get(SCALARS_KEY) if isinstance(g, Mapping) else None for g in saved_groups]
        found = [m for m in ([meta] if meta is not None else []) + (group_meta or [])]
        for m in found:
            expected = 1 if m is meta else STATE_DICT_FORMAT
            if not isinstance(m, Mapping) or m.get("format") != expected:
                where = "the top-level 'lrfree' entry" if m is meta else "a param group's 'lrfree' entry"
                version = m.get("format") if isinstance(m, Mapping) else m
                raise ValueError(f"{owner}: {where} has format {version!r}; it was saved by a newer lrfree (or "
                                 f"lost part of its entries), which this version (format {STATE_DICT_FORMAT}, "
                                 "reading 1) cannot read")
            if m.get("method") != type(self).__name__:
                raise ValueError(f"{owner}: the state dict was saved by {m.get('method')}, "
                                 f"not {type(self).__name__}")
        if meta is not None and group_meta is not None:
            raise ValueError(f"{owner}: the state dict has both a top-level 'lrfree' entry (format 1) and "
                             "'lrfree' entries in its param groups (format 2)")
        return meta, group_meta

    def _load(self, owner: str, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{owner}: expected a dict with 'state' and 'param_groups'")
        meta, group_meta = self._format(owner, state_dict)
        new_groups = self._loaded_groups(owner, state_dict["param_groups"])
        params_by_id = {}
        for saved, group in zip(state_dict["param_groups"], new_groups):
            for pid, p in zip(saved["params"], group["params"]):
                params_by_id[pid] = (p, group)
        new_state, per_tensor_scalars = self._loaded_state(owner, state_dict["state"], params_by_id)

        # The new store is built and checked aside, and swapped in only once it is complete.
        old = self._scalar_store, self._scalar_domain, self._store_shape, self.param_groups
        self._scalar_store, self._scalar_domain, self._store_shape = {}, {}, (0, 0)
        self.param_groups = new_groups
        try:
            self._sync_store()
            if group_meta is not None:
                meta = {"scalars": self._gathered_scalars(owner, group_meta, per_tensor_scalars)}
            self._loaded_scalars(owner, meta, new_state, per_tensor_scalars)
        except Exception:
            self._scalar_store, self._scalar_domain, self._store_shape, self.param_groups = old
            raise
        state: defaultdict = defaultdict(dict)
        state.update(new_state)
        self.state = state

    def _gathered_scalars(self, owner: str, group_meta: list[Mapping],
                          per_tensor_scalars: dict[torch.Tensor, dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Format 2's scalars (spread over the param groups and the parameters' state) as one store, by
        the domains of this optimizer's store (built for the loaded groups)."""
        domain = self._scalar_domain
        saved_names = set().union(*(set(m.get("scalars", {})) for m in group_meta))
        expected = {name for name, d in domain.items() if d != _TENSOR}
        # the rounding counter exists under stochastic rounding (of parameters or state): a checkpoint saved
        # without it (or with it, loaded into an optimizer that rounds to nearest) loses nothing by it
        if saved_names - {_ROUNDING} != expected - {_ROUNDING}:
            raise ValueError(f"{owner}: the param groups' saved scalars {sorted(saved_names)} do not match this "
                             f"method's {sorted(expected)}")

        def scalar(value: Any, where: str) -> torch.Tensor:
            if isinstance(value, DTensor):
                value = value.to_local()
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"{owner}: {where} has the wrong shape ({shape}); expected one value")
            return value.detach().reshape(()).to(device=self.device, dtype=torch.float64)

        out: dict[str, torch.Tensor] = {}
        for name, d in domain.items():
            if name == _ROUNDING and name not in saved_names:  # a fresh counter: new bits from here on
                out[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            elif d == _GLOBAL:
                out[name] = scalar(group_meta[0].get("scalars", {}).get(name), f"param_groups[0] scalar {name!r}")
            elif d == _GROUP:
                out[name] = torch.stack([scalar(m.get("scalars", {}).get(name), f"param_groups[{i}] scalar {name!r}")
                                         for i, m in enumerate(group_meta)])
            else:
                values = []
                for gi, j, group, p in self._labelled_params():
                    saved = per_tensor_scalars.get(p, {})
                    if name not in saved:
                        raise ValueError(f"{owner}: the state of {V.param_label(group, gi, j, p)} lacks its "
                                         f"per-tensor scalar {name!r}")
                    values.append(scalar(saved[name], f"scalar {name!r} of {V.param_label(group, gi, j, p)}"))
                out[name] = torch.stack(values)
        return out

    def _loaded_groups(self, owner: str, saved_groups: Any) -> list[dict]:
        """The saved param groups over this optimizer's parameters, a missing key filled in with the
        constructor's default and every value validated as if passed to the constructor."""
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            count = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else type(saved_groups).__name__
            raise ValueError(f"{owner}: {count} param groups saved, {len(self.param_groups)} in this optimizer")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved, Mapping) or len(saved.get("params", ())) != len(group["params"]):
                count = len(saved.get("params", ())) if isinstance(saved, Mapping) else 0
                raise ValueError(f"{owner}: param_groups[{i}] has {count} params saved but "
                                 f"{len(group['params'])} here")
        new_groups: list[dict] = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            # the scalars travel in the group only inside the state dict; the live group keeps options only
            loaded = copy.deepcopy({k: v for k, v in saved.items() if k not in ("params", SCALARS_KEY)})
            # Keys the saving optimizer did not have (a newer option, or an lrfree-only one when torch
            # saved it) take the constructor's value, as torch's optimizers do in their __setstate__.
            for key, default in self.defaults.items():
                loaded.setdefault(key, copy.deepcopy(default))
            self._validate_hyperparameters(owner, i, loaded, new_groups[0] if new_groups else loaded)
            loaded["params"] = group["params"]
            if "param_names" in group and "param_names" not in loaded:
                loaded["param_names"] = group["param_names"]
            new_groups.append(loaded)
        return new_groups

    def _loaded_state(self, owner: str, saved_state: Any, params_by_id: dict
                      ) -> tuple[dict, dict[torch.Tensor, dict[str, Any]]]:
        """The per-parameter state on this optimizer's device and dtypes, checked against what a fresh
        step would create, and the per-tensor step scalars found beside it (format 2 keeps them there, and
        torch's optimizers keep theirs there: ``step`` of ``torch.optim.Adam``)."""
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"{owner}: 'state' must map parameter ids to dicts, got {type(saved_state).__name__}")
        tensor_scalars = set(self._initial_tensor_scalar_names())
        new_state: dict = {}
        per_tensor_scalars: dict[torch.Tensor, dict[str, Any]] = {}
        for pid, saved in saved_state.items():
            if pid not in params_by_id:
                raise ValueError(f"{owner}: state for unknown parameter id {pid!r}")
            if not isinstance(saved, Mapping):
                raise ValueError(f"{owner}: state of parameter {pid} is a {type(saved).__name__}, expected a dict")
            if not saved:
                continue  # a parameter that has not stepped yet
            p, group = params_by_id[pid]
            template = self._new_state(p, group)
            moved = {k: saved[k] for k in tensor_scalars & (set(saved) - set(template))}
            if moved:
                per_tensor_scalars[p] = moved
            saved = {k: v for k, v in saved.items() if k not in moved}
            if not saved:
                continue  # only its step scalars: a parameter without state (not stepped, or a stateless method)
            if set(saved) != set(template):
                raise ValueError(f"{owner}: state of parameter {pid} has keys {sorted(saved)}, "
                                 f"expected {sorted(template)}")
            entry = {}
            for key, ref in template.items():
                value = saved[key]
                if isinstance(value, DTensor):
                    value = value.to_local()
                    if value.shape != ref.shape and value.numel() == ref.numel():
                        value = value.reshape(ref.shape)  # saved as the shard's shape (see _saved_state_tensor)
                if isinstance(value, torch.Tensor) and value.is_complex():
                    value = torch.view_as_real(value)  # torch keeps a complex parameter's state complex
                if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"{owner}: state[{pid}][{key!r}] is {shape}, "
                                     f"expected a tensor of shape {tuple(ref.shape)}")
                entry[key] = value.detach().to(device=ref.device, dtype=ref.dtype).clone()
            new_state[p] = entry
        return new_state, per_tensor_scalars

    def _initial_tensor_scalar_names(self) -> list[str]:
        for group in self.param_groups:
            for p in group["params"]:
                return list(self.initial_tensor_scalars(group, p))
        return []

    def _loaded_scalars(self, owner: str, meta: Mapping | None, new_state: dict,
                        per_tensor_scalars: dict[torch.Tensor, dict[str, Any]]) -> None:
        """Fill the fresh scalar store (built for the loaded groups) from the saved one.

        Without an ``"lrfree"`` entry only per-tensor scalars found in the parameters' state can be
        restored (torch's Adam keeps ``step`` there); the step counters and :attr:`recomputed_scalars`
        restart harmlessly. A method with any other step scalar (``d``, a Polyak step size ...) refuses:
        nothing tells a state dict saved before the first step from one whose scalars were dropped, and
        restarting them on trained parameters would silently change the run.
        """
        store = self._scalar_store
        if meta is not None:
            saved_scalars = meta.get("scalars", {})
            if not isinstance(saved_scalars, Mapping) or set(saved_scalars) != set(store):
                names = sorted(saved_scalars) if isinstance(saved_scalars, Mapping) else saved_scalars
                raise ValueError(f"{owner}: saved scalars {names} do not match this method's {sorted(store)}")
            for name, ref in store.items():
                value = saved_scalars[name]
                if isinstance(value, torch.Tensor) and value.shape != ref.shape and name in self.recomputed_scalars:
                    continue  # e.g. ClippedSGD's clip_coef, one per group since 0.1.0's per-group max_norm
                if not isinstance(value, torch.Tensor) or value.shape != ref.shape:
                    raise ValueError(f"{owner}: scalar {name!r} has the wrong shape")
                ref.copy_(value.to(device=ref.device, dtype=torch.float64))
            return
        recovered = {name for values in per_tensor_scalars.values() for name in values}
        lost = sorted(set(store) - _COUNTERS - self.recomputed_scalars - recovered)
        if lost:
            raise ValueError(f"{owner}: this state dict has no 'lrfree' entry, so the step scalars {lost} are "
                             "missing; it was saved by another optimizer or lost its 'lrfree' entry, and loading it "
                             "would restart them")
        position = {id(p): i for i, (_, _, p) in enumerate(self._flat_params())}
        for p, values in per_tensor_scalars.items():
            for name, value in values.items():
                value = torch.as_tensor(value, dtype=torch.float64).reshape(())
                store[name][position[id(p)]] = value.to(store[name].device)
        if "step" in recovered:  # the optimizer-wide count of taken steps, as far as the state tells
            store["steps"].copy_(store["step"].max())

    # ------------------------------------------------------------------ copy and pickle
    def __getstate__(self) -> dict[str, Any]:
        cls = type(self)
        return {name: value for name, value in self.__dict__.items()
                if name not in _HOOK_REGISTRIES and name not in _REBUILT_ON_USE and name not in _DROPPED_ON_COPY
                # a method patched onto the instance (an lr scheduler wraps ``step``) is bound to the original
                and not callable(getattr(cls, name, None))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name in _HOOK_REGISTRIES:
            self.__dict__.setdefault(name, OrderedDict())
        for name, empty in _REBUILT_ON_USE.items():
            self.__dict__[name] = empty()
        self._patch_step_function()  # torch's step hooks, for a class first seen in this process
