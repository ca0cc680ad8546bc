"""What every fused method uses: launching over dtype groups, and the Σg² pass (the non-finite guard,
and the statistic of the Polyak family, DoG and D-Adapt SGD).

A step's tensors are split by parameter dtype (each dtype is a compile-time specialization); a model
with one parameter dtype — the usual case — gets exactly one launch per pass.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import triton
import triton.language as tl

from .multi_tensor import Geometry, TL_DTYPE, aligned, geometry, launch, per_tensor, program_elements, tensor_ptr

F64 = torch.float64
MAX_WARPS = 16  # 4 elements per thread at BLOCK = 2048


def acc_dtype(dtype: torch.dtype):
    """Element math and block partials: fp64 for fp64 storage, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == torch.float64 else torch.float32


class DtypeGroup:
    """The active tensors of one parameter dtype: their positions in the step and their geometry."""

    def __init__(self, batch, index: list[int], slots: Callable[[object], Sequence[torch.Tensor]]):
        self.batch = batch
        self.index = index
        items = [batch.items[i] for i in index]
        self.items = items
        self.dtype = items[0].p.dtype
        columns = [slots(it) for it in items]
        self.geo: Geometry = geometry([[c[s] for c in columns] for s in range(len(columns[0]))])
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
    order: dict[tuple, list[int]] = {}
    for i, it in enumerate(batch.items):
        if only is None or only(it):
            variant = key(it) if key else None
            streams = slots(it) if key is None else slots(it, variant)
            order.setdefault((it.p.dtype, variant, aligned(streams)), []).append(i)
    groups = []
    for (_, variant, _), index in order.items():
        group = DtypeGroup(batch, index, lambda it, v=variant: slots(it) if key is None else slots(it, v))
        group.variant = variant
        groups.append(group)
    return groups


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
