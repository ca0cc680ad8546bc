"""What every fused method uses: launching over dtype groups, the Σg² pass (the non-finite guard,
and the statistic of the Polyak family, DoG and D-Adapt SGD), and statistics needed only until a device
flag says they are known (``until_known``: PS-DA-SGD's start pass, D-Adapt SGD's ‖g0‖ without the guard).

A step's tensors are split by parameter dtype (each dtype is a compile-time specialization); a model
with one parameter dtype — the usual case — gets exactly one launch per pass.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from lrfree import precision

from .multi_tensor import (REDUCE_LANES, Geometry, TL_DTYPE, _segment_reduce_kernel, aligned, block_elements, geometry,
                           launch, per_tensor, program_elements, tensor_ptr)

F64 = torch.float64
MAX_WARPS = 16  # 4 elements per thread at BLOCK = 2048


def acc_dtype(dtype: torch.dtype):
    """Element math and block partials: fp64 for fp64 storage, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == torch.float64 else torch.float32


class DtypeGroup:
    """The active tensors of one parameter dtype: their positions in the step and their geometry."""

    def __init__(self, batch, index: list[int], slots: Callable[[object], Sequence[torch.Tensor]] | None,
                 geo: Geometry | None = None):
        """``slots(item)`` lists the tensors the kernel streams; or ``geo`` is their geometry, known."""
        self.batch = batch
        self.index = index
        items = [batch.items[i] for i in index]
        self.items = items
        self.dtype = items[0].p.dtype
        if geo is None:
            columns = [slots(it) for it in items]
            geo = geometry([[c[s] for c in columns] for s in range(len(columns[0]))])
        self.geo: Geometry = geo
        self.whole = len(index) == len(batch.items)

    def tiling(self, warps: int) -> dict:
        """A launch's tile: BLOCK elements per program, 128-bit accesses when aligned, and its warps.

        ``warps`` is the kernel's own choice for aligned fp32/bf16/fp16 tensors, made from its compiled
        register count (a thread then holds BLOCK / (32 · warps) elements of every stream). Scalar accesses
        (not aligned) and fp64 need about twice the registers per element, so they get twice the warps
        each: every variant keeps >= 16 resident warps per SM on an H100, without spills (checked ahead of
        time for every variant by tests/test_kernels_compile.py; table in bench/KERNELS.md)."""
        warps *= (1 if self.geo.aligned else 2) * (2 if self.dtype == torch.float64 else 1)
        return {"BLOCK": self.geo.block, "ALIGNED": self.geo.aligned, "num_warps": min(warps, MAX_WARPS)}

    @property
    def tl_dtype(self):
        return TL_DTYPE[self.dtype]

    @property
    def acc(self):
        return acc_dtype(self.dtype)

    @property
    def state_tl(self):
        """The dtype the group's per-element statistics are stored in (lrfree.precision)."""
        return TL_DTYPE[precision.storage_dtype(precision.state_dtype_of(self.batch.optimizer), self.dtype)]

    def _indices(self) -> torch.Tensor:
        """The group's positions among the step's items, as a cached device index."""
        return self.batch.index(self.index)

    def take(self, vector: torch.Tensor) -> torch.Tensor:
        """The entries of a per-item vector that belong to this group."""
        return vector if self.whole else vector.index_select(0, self._indices())

    def partials(self, k: int) -> torch.Tensor:
        return self.geo.partials(k, torch_acc_dtype(self.dtype))


def dtype_groups(batch, slots: Callable[[object], Sequence[torch.Tensor]], key: Callable | None = None,
                 only: Callable | None = None) -> list[DtypeGroup]:
    """Split the step's items by parameter dtype (and ``key(item)``, a compile-time variant such as
    "has a momentum buffer"), keeping those with ``only(item)``; ``slots(item)`` lists the tensors a
    kernel streams. Each group carries ``variant``, its ``key`` value. Tensors whose streams are not all
    aligned for 128-bit accesses (``multi_tensor.aligned``) form groups of their own."""
    # The step's tensors, in what decides the grouping and the geometry: each one's variant, dtype, size and
    # the addresses of its streams. Reading these is the only per-tensor host work of a launch: the groups
    # and geometries made from them are kept for the next step with the same tensors (measured on 592
    # tensors, with the launches stubbed out: 2.9 → 1.2 ms per Adam step on the host).
    signature = []
    for it in batch.items:
        if only is not None and not only(it):
            signature.append(None)
            continue
        variant = key(it) if key else None
        streams = slots(it) if key is None else slots(it, variant)
        signature.append((variant, it.p.dtype, streams[0].numel(), *[t.data_ptr() for t in streams]))
    signature = tuple(signature)
    plan = _plans.get(signature)
    if plan is None:
        order: dict[tuple, list[int]] = {}
        for i, it in enumerate(batch.items):
            if signature[i] is not None:
                variant = signature[i][0]
                streams = slots(it) if key is None else slots(it, variant)
                order.setdefault((it.p.dtype, variant, aligned(streams)), []).append(i)
        plan = []
        for (_, variant, _), index in order.items():
            group = DtypeGroup(batch, index, lambda it, v=variant: slots(it) if key is None else slots(it, v))
            plan.append((variant, index, group.geo))
        _plans[signature] = plan
        if len(_plans) > _PLANS:
            _plans.popitem(last=False)
    else:
        _plans.move_to_end(signature)
    groups = []
    for variant, index, geo in plan:
        group = DtypeGroup(batch, index, None, geo)
        group.variant = variant
        groups.append(group)
    return groups


# dtype_groups' plans by the signature of the step's tensors: a few per method (one per pass); as many as
# multi_tensor keeps geometries, since a plan keeps its geometries (and their partials buffers) alive
_plans: "OrderedDict[tuple, list]" = OrderedDict()
_PLANS = 64


def assemble(batch, parts: list[tuple[DtypeGroup, torch.Tensor]]) -> torch.Tensor:
    """(items, K) per-tensor results from the per-dtype-group ones, in item order."""
    if len(parts) == 1 and parts[0][0].whole:
        return parts[0][1]
    k = parts[0][1].shape[1]
    out = torch.zeros((len(batch.items), k), dtype=F64, device=batch.device)
    for group, values in parts:
        out.index_copy_(0, group._indices(), values)
    return out


def reduce_partials(group: DtypeGroup, partials: torch.Tensor, max_columns: Sequence[int] = ()) -> torch.Tensor:
    return per_tensor(partials, group.geo, max_columns)


def ok_flag(batch) -> torch.Tensor:
    """The step's accept flag as an int32 the kernels can load (cached for the step)."""
    if batch.ok_i32 is not None:  # written by the method's rule kernel
        return batch.ok_i32
    flag = getattr(batch, "_ok_i32", None)
    if flag is None:
        flag = batch.ok.to(torch.int32)
        batch._ok_i32 = flag
    return flag


@triton.jit
def _sumsq_kernel(g_ptrs, numels, block_tensor, block_start, partials,
                  G: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    g = tl.load(tensor_ptr(g_ptrs, t, G, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    tl.store(partials + pid, tl.sum(g * g, axis=0))


def grad_sq(batch) -> torch.Tensor:
    """(items,) fp64 Σg² per tensor."""
    parts = []
    for group in dtype_groups(batch, lambda it: (it.g,)):
        geo = group.geo
        partials = group.partials(1)
        launch(_sumsq_kernel, (geo.n_blocks,), geo.slot(0), geo.numels, geo.block_tensor, geo.block_start,
               partials, G=group.tl_dtype, ACC=group.acc, **group.tiling(warps=4))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)[:, 0]


# -------------------------------------------------------------------------- statistics until known
# A statistic a method needs only until a device flag says it is known (PS-DA-SGD's n0 and rms(α0), D-Adapt
# SGD's ‖g0‖ without the guard) cannot be skipped by the host without a sync. It runs as a small
# persistent launch instead of a full grid: min(blocks, PERSISTENT_PROGRAMS) programs, program p taking
# blocks p, p + P, p + 2P, ... (a fixed assignment) while the flag is 0 and none once it is set. 1024
# programs of 4 warps fill an H100 (132 SMs) in one wave at ~8 programs (31 warps) per SM, above the 16
# resident warps a stream needs, and an A100 (108 SMs) alike; once the flag is set the launch is 1024
# flag loads and row stores, and its reduction one program over 1024 rows.
PERSISTENT_PROGRAMS = 1024


@triton.jit
def until_known_end(known, n_blocks):
    """The end of a persistent program's block loop (blocks program_id, + programs, ... below it): every
    block while the int32 flag ``*known`` is 0, none once it is set (the program then writes a row of
    zeros). The loop is a ``while``: Triton 3.6's interpreter takes no run-time ``range`` bounds."""
    return tl.where(tl.load(known) != 0, 0, n_blocks)


def persistent_programs(geo: Geometry) -> int:
    """Programs of a persistent launch over ``geo``: one per block up to PERSISTENT_PROGRAMS (at least one,
    so that a group without elements still writes its row)."""
    return max(1, min(geo.n_blocks, PERSISTENT_PROGRAMS))


def is_until_known(kernel) -> bool:
    """True for a kernel launched by :func:`until_known` (its last arguments are ``n_blocks, programs``):
    it streams its tensors only until its flag is set, so a steady-state step's traffic leaves it out."""
    names = [n for n in inspect.signature(getattr(kernel, "fn", kernel)).parameters if not n.isupper()]
    return names[-2:] == ["n_blocks", "programs"]


def until_known(batch, known: torch.Tensor, kernel, k: int, slots: Callable, args: Callable, warps: int,
                reduce: bool = True, group_flags: Callable | None = None, **flags) -> torch.Tensor:
    """(1, k) fp64: the sums over the batch's elements of a statistic needed only until the 0-d device
    flag ``known`` is true, and zeros once it is (the caller must then not use them). ``reduce=False``
    returns the programs' (P, k) rows instead, for a rule kernel that totals them itself (P ≤
    PERSISTENT_PROGRAMS per dtype group: one lane pass of ``scalar_math.column_total``), saving a launch.

    ``kernel`` is a persistent kernel ``kernel(*args(group), known, rows, n_blocks, programs, X, ACC,
    BLOCK, ALIGNED, **flags)`` whose program ``pid`` loops over blocks pid, pid + programs, ... below
    ``until_known_end(known, n_blocks)`` (``multi_tensor.block_elements``) and writes its k fp64 sums to row
    ``pid`` of ``rows``; ``slots(item)`` lists the tensors it streams (the dtype groups), ``group_flags(group)``
    (optional) the compile-time flags that depend on the dtype group. Every dtype group writes its own rows of
    one buffer, and one reduction adds them all in a fixed order."""
    flag = known.to(torch.int32)
    groups = dtype_groups(batch, slots)
    programs = [persistent_programs(group.geo) for group in groups]
    total = sum(programs)
    rows = torch.empty((total, k), dtype=F64, device=batch.device)
    offset = 0
    for group, n in zip(groups, programs):
        launch(kernel, (n,), *args(group), flag, rows[offset:offset + n], group.geo.n_blocks, n,
               X=group.tl_dtype, ACC=group.acc, **group.tiling(warps=warps), **flags,
               **(group_flags(group) if group_flags else {}))
        offset += n
    if not reduce:
        return rows
    out = torch.empty((1, k), dtype=F64, device=batch.device)
    bounds = batch.optimizer._coefficient_vector((0, total), torch.int32)
    launch(_segment_reduce_kernel, (1,), rows, bounds, out, K=k, MAX_MASK=0, CHUNK=REDUCE_LANES)
    return out


@triton.jit(do_not_specialize=["n_blocks", "programs"])
def _sumsq_until_kernel(g_ptrs, numels, block_tensor, block_start, weights, known, rows, n_blocks, programs,
                        X: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    total = tl.zeros((), tl.float64)
    end = until_known_end(known, n_blocks)
    b = pid
    while b < end:
        t, offs, mask = block_elements(b, numels, block_tensor, block_start, BLOCK, ALIGNED)
        g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
        # the block's sum, as the Σg² pass forms it, times its tensor's fp64 weight (1 when unweighted)
        total += tl.sum(g * g, axis=0).to(tl.float64) * tl.load(weights + t)
        b += programs
    tl.store(rows + pid, total)


def grad_sq_until(batch, known: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(1,) fp64 Σ w_t Σg² over the batch's local elements while the device flag ``known`` is false (0
    after), in a small persistent launch (see ``until_known``); ``weights`` one fp64 value per tensor
    (None: all 1)."""
    if weights is None:
        weights = batch.vector(1.0 for _ in batch.items)
    return until_known(batch, known, _sumsq_until_kernel, 1, lambda it: (it.g,),
                       lambda group: (group.geo.slot(0), group.geo.numels, group.geo.block_tensor,
                                      group.geo.block_start, group.take(weights)), warps=4)[:, 0]
