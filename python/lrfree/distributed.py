"""Step statistics under data parallelism: which ranks hold what, and how a step's global scalars form.

lrfree's step sizes are functions of global reductions (Σg², ⟨g, s⟩, ‖s‖₁, a max-ratio, the loss). Under
data parallelism there are two layouts, and each needs different collectives:

* **replicated** (DDP): every rank holds whole parameters and the same all-reduced gradients, so every
  reduction over parameter elements is already global on every rank. Only the loss differs — each rank
  computed it on its own micro-batch — and loss-driven methods (the Polyak family, PS-SPS) average it
  to match the averaged gradient: one 1-element all-reduce per step; none for the other methods.
* **sharded** (FSDP2 ``fully_shard`` / DTensor ``Shard`` placements, or ZeRO-style shards given as plain
  tensors): every rank holds the *same list* of tensors, each one a shard (possibly empty) of the global
  tensor. A per-tensor partial summed over ranks is the global per-tensor statistic, so a method's
  whole (tensors × statistics) matrix is made global by one SUM all-reduce, and PS-DA-SGD's max-ratio
  by one MAX. The non-finite guard must be global too (a NaN on one shard skips the step on every rank),
  so its witness and the loss ride in the method's first SUM.

A step therefore issues one SUM per *sync point* of its method (see ``StepBatch.sync``): one for methods
whose first statistics pass writes nothing (Polyak family, PS-SPS, clipped SGD, DoG/LDoG, Adam/AdamW,
COCOB), two for those whose single update pass must know the guard before it writes and reduces its
statistics afterwards (D-Adapt SGD/Adam, Prodigy, PS-DA-SGD — plus PS-DA-SGD's MAX). Never one per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

try:  # DTensor is public from torch 2.4; lrfree runs without torch.distributed support too
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch builds without distributed
    DTensor, Shard = (), ()

__all__ = ["ShardLayout", "layout_for", "local"]


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank stores: a DTensor's local shard (sharing its storage), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_real(t: torch.Tensor) -> torch.Tensor:
    """What a step reads and writes of parameter or gradient ``t``: its :func:`local` part, and for a
    complex tensor that part viewed as real numbers (``torch.view_as_real``: the real and imaginary parts
    as a last dimension of 2, sharing storage), as torch's optimizers step complex parameters. Every
    method is element-wise or norm-based, and Σ|z|² over the real view is the complex norm²."""
    t = local(t)
    return torch.view_as_real(t) if t.is_complex() else t


@dataclass(frozen=True)
class ShardLayout:
    """Where the optimizer's tensors live across ranks, and the collectives that make statistics global."""

    group: Any  # the torch.distributed process group
    sharded: bool
    world_size: int

    def all_reduce_sum_(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)

    def all_reduce_max_(self, flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=self.group)

    def __deepcopy__(self, memo: dict) -> "ShardLayout":
        return self  # a copy of the optimizer runs on the same ranks: the process group is shared, not copied


def layout_for(owner: str, params: Iterable[torch.Tensor], process_group: Any, sharded: bool | None
               ) -> ShardLayout | None:
    """The layout an optimizer runs under, from its parameters and the ``process_group`` / ``sharded``
    options; ``None`` for single-process training.

    DTensor parameters (FSDP2) imply ``sharded=True`` and the mesh's process group. Plain tensors need an
    explicit ``process_group``: ``sharded=False`` (the default) for DDP, ``True`` for ZeRO-style shards.
    """
    params = list(params)
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if dtensors and len(dtensors) != len(params):
        raise ValueError(f"{owner}: some parameters are DTensors and others are plain tensors; an lrfree "
                         "optimizer needs one layout for all its parameters (shard every module with fully_shard, "
                         "or none)")
    if sharded is not None and not isinstance(sharded, bool):
        raise TypeError(f"{owner}: sharded must be True, False or None, got {sharded!r}")
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{owner}: process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")
    if dtensors:
        mesh = dtensors[0].device_mesh
        for p in dtensors:
            if p.device_mesh != mesh or p.device_mesh.ndim != 1:
                raise ValueError(f"{owner}: DTensor parameters must share one 1-D device mesh (FSDP2 fully_shard); "
                                 f"got a mesh of shape {tuple(p.device_mesh.shape)}")
            if not all(isinstance(pl, Shard) for pl in p.placements):
                raise ValueError(f"{owner}: a DTensor parameter of shape {tuple(p.shape)} has placements "
                                 f"{p.placements}; lrfree sums statistics over Shard placements only")
        if sharded is False:
            raise ValueError(f"{owner}: sharded=False, but the parameters are sharded DTensors")
        group = process_group if process_group is not None else mesh.get_group()
        return ShardLayout(group, True, dist.get_world_size(group))
    if process_group is None:
        if sharded:
            raise ValueError(f"{owner}: sharded=True needs the process_group that holds the other shards")
        return None
    return ShardLayout(process_group, bool(sharded), dist.get_world_size(process_group))
