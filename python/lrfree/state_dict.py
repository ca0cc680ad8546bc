"""Checkpoints of an lrfree optimizer: ``state_dict`` / ``load_state_dict`` and pickling.

:class:`Checkpointing` is the part of :class:`~lrfree.optimizer.FusedOptimizer` that saves and restores
it. It keeps ``torch.optim.Optimizer``'s contract, hooks included:

* ``state_dict()`` is torch's ``{"state", "param_groups"}`` plus an ``"lrfree"`` entry holding the
  device-resident step scalars (``d``, step counters, ...), which live in no parameter's state.
  ``register_state_dict_pre_hook`` / ``_post_hook`` run around it, as in torch.
* ``load_state_dict()`` validates everything before it changes anything. A param group saved without a
  key this optimizer has (a state dict from an older lrfree, or from ``torch.optim.Adam`` loaded into
  ``lrfree.Adam``) gets the constructor's default, as torch's optimizers do; a state dict without the
  ``"lrfree"`` entry loads when the method loses nothing by it (see :meth:`Checkpointing._loaded_scalars`).
  ``register_load_state_dict_pre_hook`` / ``_post_hook`` run around it.
* ``copy.deepcopy`` and pickle keep every attribute (options, backend, layout, scalar store), where
  torch's ``Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from typing import Any, ClassVar, Mapping

import torch

STATE_DICT_FORMAT = 1

# Step counters every optimizer has; a state dict from another optimizer may lack them without losing
# anything the method's update reads.
_COUNTERS = frozenset({"steps", "skipped", "rounding_step"})

# torch.optim.Optimizer's hook registries. A copy starts with none, as a copy of a torch optimizer does:
# a hook usually closes over the optimizer it was registered on, and would act on the original.
_HOOK_REGISTRIES = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                    "_optimizer_load_state_dict_post_hooks")

# Caches keyed by host values or by tensor identity, rebuilt on first use: a copy starts them empty.
_REBUILT_ON_USE = {"_vectors": dict, "_master_grads": dict}
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
        indices) plus ``"lrfree"``: the format, the method and the step scalars with their domains."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        index_of: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index_of.setdefault(id(p), len(index_of)) for p in group["params"]]
            groups.append(packed)
        self._sync_store()
        saved = {
            "state": {index_of[id(p)]: value for p, value in self.state.items()},
            "param_groups": groups,
            "lrfree": {
                "format": STATE_DICT_FORMAT,
                "method": type(self).__name__,
                "scalars": {k: v.detach().clone() for k, v in self._scalar_store.items()},
                "domains": dict(self._scalar_domain),
            },
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            replaced = hook(self, saved)
            if replaced is not None:
                saved = replaced
        return saved

    # ------------------------------------------------------------------ load
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict saved by the same method, on any device or backend (or by torch.optim's
        counterpart, or an older lrfree: see the module's docstring).

        Everything is validated before anything is changed: a mismatched or corrupt state dict raises
        ``ValueError`` and leaves the optimizer as it was. State tensors keep lrfree's dtype policy
        (fp32 state for low-precision parameters) rather than being cast to the parameter dtype.
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

    def _load(self, owner: str, state_dict: Mapping[str, Any]) -> None:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"{owner}: expected a dict with 'state' and 'param_groups'")
        meta = state_dict.get("lrfree")
        if meta is not None:
            if not isinstance(meta, Mapping) or meta.get("format") != STATE_DICT_FORMAT:
                raise ValueError(f"{owner}: unknown 'lrfree' entry (format "
                                 f"{meta.get('format') if isinstance(meta, Mapping) else meta!r}); it was saved "
                                 f"by a newer lrfree, which this version (format {STATE_DICT_FORMAT}) cannot read")
            if meta.get("method") != type(self).__name__:
                raise ValueError(f"{owner}: the state dict was saved by {meta.get('method')}, "
                                 f"not {type(self).__name__}")
        new_groups = self._loaded_groups(owner, state_dict["param_groups"])
        params_by_id = {}
        for saved, group in zip(state_dict["param_groups"], new_groups):
            for pid, p in zip(saved["params"], group["params"]):
                params_by_id[pid] = (p, group)
        new_state, per_tensor_scalars = self._loaded_state(owner, state_dict["state"], params_by_id, meta is None)

        # The new store is built and checked aside, and swapped in only once it is complete.
        old = self._scalar_store, self._scalar_domain, self._store_shape, self.param_groups
        self._scalar_store, self._scalar_domain, self._store_shape = {}, {}, (0, 0)
        self.param_groups = new_groups
        try:
            self._sync_store()
            self._loaded_scalars(owner, meta, new_state, per_tensor_scalars)
        except Exception:
            self._scalar_store, self._scalar_domain, self._store_shape, self.param_groups = old
            raise
        state: defaultdict = defaultdict(dict)
        state.update(new_state)
        self.state = state

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
            loaded = copy.deepcopy({k: v for k, v in saved.items() if k != "params"})
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

    def _loaded_state(self, owner: str, saved_state: Any, params_by_id: dict, foreign: bool
                      ) -> tuple[dict, dict[torch.Tensor, dict[str, Any]]]:
        """The per-parameter state on this optimizer's device and dtypes, checked against what a fresh
        step would create. ``foreign`` (no ``"lrfree"`` entry): a per-tensor step scalar may come from the
        parameter's state, where torch's optimizers keep it (``step`` of ``torch.optim.Adam``)."""
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"{owner}: 'state' must map parameter ids to dicts, got {type(saved_state).__name__}")
        tensor_scalars = set(self._initial_tensor_scalar_names())
        new_state: dict = {}
        per_tensor_scalars: dict[torch.Tensor, dict[str, Any]] = {}
        for pid, saved in saved_state.items():
            if pid not in params_by_id:
                raise ValueError(f"{owner}: state for unknown parameter id {pid!r}")
            if isinstance(saved, Mapping) and not saved:
                continue  # a parameter that has not stepped yet
            p, group = params_by_id[pid]
            template = self._new_state(p, group)
            if not isinstance(saved, Mapping):
                raise ValueError(f"{owner}: state of parameter {pid} is a {type(saved).__name__}, expected a dict")
            if foreign:
                moved = {k: saved[k] for k in tensor_scalars & (set(saved) - set(template))}
                if moved:
                    per_tensor_scalars[p] = moved
                saved = {k: v for k, v in saved.items() if k not in moved}
            if set(saved) != set(template):
                raise ValueError(f"{owner}: state of parameter {pid} has keys {sorted(saved)}, "
                                 f"expected {sorted(template)}")
            entry = {}
            for key, ref in template.items():
                value = saved[key]
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
