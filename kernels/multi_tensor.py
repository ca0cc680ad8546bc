"""Multi-tensor launches: one kernel launch covers every tensor of a step.

A launch is described by a ``Geometry``: for each *slot* (param, grad, one per state tensor) an int64
table of data pointers, the element count of every tensor, and a block → (tensor, first element) map,
so that program ``pid`` of a 1-D grid processes elements ``[start, start + BLOCK)`` of tensor
``tensor[pid]``. Offsets are int64, so tensors over 2³¹ elements work. Geometries are cached by the
tensors' data pointers and sizes and rebuilt only when those change (new parameters, new state).

Reductions never use atomics: every program writes its partial sums to its own row of a
``(blocks, K)`` buffer and :func:`per_tensor_sums` adds each tensor's rows in a fixed order in fp64,
so the same step run twice is bit-identical.
"""

from __future__ import annotations

import contextvars
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import torch
import triton
import triton.language as tl

TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}

# One program streams DEFAULT_BLOCK elements; large enough to amortize the table lookups, small
# enough to keep every SM busy on LLM-sized tensor lists.
DEFAULT_BLOCK = 2048
_CACHE_SIZE = 64

# Every kernel launch of lrfree goes through ``launch``; tests read the count to check that the number
# of launches per step does not grow with the number of tensors.
launch_count = 0


# Where launches go: None runs the Triton kernel; backend="cuda" sets a callable that runs the compiled
# extension's kernel of the same name with the same arguments instead (lrfree.backends.cuda_ext).
kernel_target: contextvars.ContextVar = contextvars.ContextVar("lrfree_kernel_target", default=None)


def launch(kernel, grid, *args, **kwargs) -> None:
    global launch_count
    if grid[0] == 0:  # only zero-element tensors: nothing to do (and CUDA rejects empty grids)
        return
    launch_count += 1
    target = kernel_target.get()
    if target is not None:
        target(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


@dataclass(frozen=True, eq=False)
class Geometry:
    pointers: torch.Tensor  # int64 (slots, tensors)
    numels: torch.Tensor  # int64 (tensors,)
    block_tensor: torch.Tensor  # int32 (blocks,)
    block_start: torch.Tensor  # int64 (blocks,)
    block_first: torch.Tensor  # int32 (tensors + 1,): the first block of every tensor, and the end
    n_blocks: int
    n_tensors: int
    block: int
    _buffers: dict = field(default_factory=dict)

    def slot(self, i: int) -> torch.Tensor:
        return self.pointers[i]

    def partials(self, k: int, dtype: torch.dtype) -> torch.Tensor:
        """A (blocks, k) buffer for block partials, allocated once per geometry: a pass's partials are
        reduced (stream-ordered) before the next pass can reuse it, so a step allocates nothing that
        grows with the number of parameters."""
        buf = self._buffers.get((k, dtype))
        if buf is None:
            buf = self._buffers[(k, dtype)] = torch.empty((self.n_blocks, k), dtype=dtype,
                                                          device=self.numels.device)
        return buf


_geometries: "OrderedDict[tuple, Geometry]" = OrderedDict()


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def dense(t: torch.Tensor) -> bool:
    """Non-overlapping and without gaps in some dimension order (contiguous, channels_last, ...): an
    element-wise kernel may then walk its memory as one flat array."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_layouts(slots: Sequence[Sequence[torch.Tensor]]) -> None:
    for j, lead in enumerate(slots[0]):
        for slot in slots:
            t = slot[j]
            same_order = (t.is_contiguous() and lead.is_contiguous()) or (
                t.shape == lead.shape and t.stride() == lead.stride())
            if not dense(t) or (t.numel() == lead.numel() and not same_order):
                raise ValueError(
                    f"the fused kernels need every tensor of a parameter (the parameter, its gradient and its "
                    f"state) to be dense with one memory layout; got strides {t.stride()} for shape "
                    f"{tuple(t.shape)} next to {lead.stride()}; use backend='torch' for such parameters")


def geometry(slots: Sequence[Sequence[torch.Tensor]], block: int = DEFAULT_BLOCK) -> Geometry:
    """The (cached) launch geometry of aligned tensor lists; slot 0 defines sizes and blocks.

    Tensors must be dense (``dense``) with the layout of their slot-0 tensor, which lets a kernel treat
    them as flat arrays; a slot may hold tensors with fewer elements than slot 0 (Prodigy's sliced
    state), which the kernel indexes itself.
    """
    key = (block, tuple(tuple((t.data_ptr(), t.numel()) for t in slot) for slot in slots))
    cached = _geometries.get(key)
    if cached is not None:
        _geometries.move_to_end(key)
        return cached
    first = slots[0]
    device = first[0].device
    check_layouts(slots)
    numels = [t.numel() for t in first]
    block_tensor, block_start, block_first = [], [], [0]
    for i, n in enumerate(numels):
        starts = range(0, n, block)
        block_tensor.extend([i] * len(starts))
        block_start.extend(starts)
        block_first.append(len(block_tensor))
    geo = Geometry(
        pointers=_to_device([t.data_ptr() for slot in slots for t in slot], torch.int64, device).view(len(slots), -1),
        numels=_to_device(numels, torch.int64, device),
        block_tensor=_to_device(block_tensor, torch.int32, device),
        block_start=_to_device(block_start, torch.int64, device),
        block_first=_to_device(block_first, torch.int32, device),
        n_blocks=len(block_tensor), n_tensors=len(numels), block=block)
    _geometries[key] = geo
    if len(_geometries) > _CACHE_SIZE:
        _geometries.popitem(last=False)
    return geo


@triton.jit
def program_elements(numels, block_tensor, block_start, BLOCK: tl.constexpr):
    """(pid, tensor, offsets, mask) of this program: elements [start, start + BLOCK) of tensor ``t``,
    through the geometry's block map (64-bit offsets). Every element-wise kernel starts here."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    offs = tl.load(block_start + pid) + tl.arange(0, BLOCK)
    return pid, t, offs, offs < tl.load(numels + t)


@triton.jit
def _segment_reduce_kernel(partials, block_first, out, K: tl.constexpr, MAX_MASK: tl.constexpr,
                           CHUNK: tl.constexpr):
    """out[t, k] = the fp64 sum (or, for the columns set in MAX_MASK, the max) of partials[b, k] over
    the blocks b of tensor t. Lanes accumulate in a fixed order and finish with a fixed tree, so the
    result is the same on every run."""
    t = tl.program_id(0)
    lo = tl.load(block_first + t)
    hi = tl.load(block_first + t + 1)
    for k in tl.static_range(K):
        is_max: tl.constexpr = (MAX_MASK >> k) & 1
        if is_max:
            acc = tl.full((CHUNK,), float("-inf"), dtype=tl.float64)
        else:
            acc = tl.zeros((CHUNK,), dtype=tl.float64)
        for b0 in range(lo, hi, CHUNK):
            idx = b0 + tl.arange(0, CHUNK)
            inside = idx < hi
            if is_max:
                v = tl.load(partials + idx.to(tl.int64) * K + k, mask=inside, other=float("-inf"))
                acc = tl.maximum(acc, v.to(tl.float64))
            else:
                v = tl.load(partials + idx.to(tl.int64) * K + k, mask=inside, other=0.0)
                acc += v.to(tl.float64)
        if is_max:
            tl.store(out + t * K + k, tl.max(acc, axis=0))
        else:
            tl.store(out + t * K + k, tl.sum(acc, axis=0))


def per_tensor(partials: torch.Tensor, geo: Geometry, max_columns: Sequence[int] = ()) -> torch.Tensor:
    """(tensors, K) fp64 reduction of the per-block partials: sums, or maxima for ``max_columns``."""
    k = partials.shape[1]
    out = torch.empty((geo.n_tensors, k), dtype=torch.float64, device=partials.device)
    mask = sum(1 << c for c in max_columns)
    launch(_segment_reduce_kernel, (geo.n_tensors,), partials, geo.block_first, out, K=k, MAX_MASK=mask, CHUNK=128)
    return out
