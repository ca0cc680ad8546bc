"""Multi-tensor launches: one kernel launch covers every tensor of a step.

A launch is described by a ``Geometry``: for each *slot* (param, grad, one per state tensor) an int64
table of data pointers, the element count of every tensor, and a block → (tensor, first element) map,
so that program ``pid`` of a 1-D grid processes elements ``[start, start + BLOCK)`` of tensor
``tensor[pid]``. Offsets are int64, so tensors over 2³¹ elements work. Geometries are cached by the
tensors' data pointers and sizes and rebuilt only when those change (new parameters, new state).

Element accesses are 128 bits wide where the compiler can prove it safe: a geometry whose every tensor
starts on a 16-byte boundary and has a multiple of 16 elements is ``aligned``, and its kernels are
compiled with ``ALIGNED`` hints (pointers 16-byte aligned, block starts multiples of BLOCK, element
counts multiples of 16). The bounds mask then has a constant value over every run of 16 elements, so it
predicates whole vectors: checked ahead of time (``lrfree.kernels.aot``), this compiles to the same
128-bit loads and stores and the same registers as an unmasked body (64 registers for Adam at 4 warps,
against 196 with per-element masks and scalar accesses). ``dtype_groups`` launches tensors that are not
aligned (a view at an odd offset, an odd element count) separately, with scalar accesses.

Reductions never use atomics: every program writes its partial sums to its own row of a
``(blocks, K)`` buffer and :func:`per_tensor` adds each tensor's rows in a fixed order in fp64, so the
same step run twice is bit-identical.
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

# One program streams DEFAULT_BLOCK elements. What limits a streaming kernel on an H100 is resident warps
# (>= 16 per SM reach the copy bandwidth: lrfree.kernels.aot.MIN_WARPS_PER_SM), which registers per thread
# decide; each kernel therefore picks its warps per program (``num_warps``) from its compiled register
# count, so that a thread holds 2048 / (32 · num_warps) elements of every stream (see NUM_WARPS).
DEFAULT_BLOCK = 2048
# Alignment, in bytes and in elements, that makes a tensor's accesses 128-bit (see the module docstring).
ALIGN_BYTES = 16
ALIGN_ELEMENTS = 16
_CACHE_SIZE = 64

# Every kernel launch of lrfree goes through ``launch``; tests read the count to check that the number
# of launches per step does not grow with the number of tensors.
launch_count = 0


# Where launches go: None runs the Triton kernel; backend="cuda" sets a callable that runs the compiled
# extension's kernel of the same name with the same arguments instead (lrfree.backends.cuda_ext).
kernel_target: contextvars.ContextVar = contextvars.ContextVar("lrfree_kernel_target", default=None)
# A context manager factory ``observer(kernel)`` entered around every launch (bench/device_ops.py counts
# launches with it, and leaves out the torch ops Triton's interpreter runs inside one); None: no observer.
launch_observer: contextvars.ContextVar = contextvars.ContextVar("lrfree_launch_observer", default=None)


def launch(kernel, grid, *args, **kwargs) -> None:
    global launch_count
    if grid[0] == 0:  # only zero-element tensors: nothing to do (and CUDA rejects empty grids)
        return
    launch_count += 1
    observer = launch_observer.get()
    if observer is None:
        _run(kernel, grid, args, kwargs)
    else:
        with observer(kernel):
            _run(kernel, grid, args, kwargs)


def _run(kernel, grid, args, kwargs) -> None:
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
    aligned: bool  # every tensor 16-byte aligned with a multiple of 16 elements: 128-bit accesses
    max_blocks: int  # the most blocks of one tensor (how long a per-tensor reduction is)
    reduction: "ReductionChunks | None" = None  # the first level of a long per-tensor reduction (per_tensor)
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


def aligned(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every tensor starts on a 16-byte boundary and holds a multiple of 16 elements (with the
    numel of the first: the one that sets the blocks; a slot may hold a sliced tensor, see geometry)."""
    return tensors[0].numel() % ALIGN_ELEMENTS == 0 and all(t.data_ptr() % ALIGN_BYTES == 0 for t in tensors)


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
        n_blocks=len(block_tensor), n_tensors=len(numels), block=block,
        aligned=all(aligned([slot[j] for slot in slots]) for j in range(len(first))),
        max_blocks=max(b - a for a, b in zip(block_first, block_first[1:])),
        reduction=_reduction_chunks(block_first, device))
    _geometries[key] = geo
    if len(_geometries) > _CACHE_SIZE:
        _geometries.popitem(last=False)
    return geo


@triton.jit
def program_elements(numels, block_tensor, block_start, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """(pid, tensor, offsets, mask) of this program: elements [start, start + BLOCK) of tensor ``t``,
    through the geometry's block map (64-bit offsets). Every element-wise kernel starts here. Under
    ``ALIGNED`` the mask is constant over runs of 16 elements, so it predicates whole 128-bit vectors."""
    pid = tl.program_id(0)
    t, offs, mask = block_elements(pid, numels, block_tensor, block_start, BLOCK, ALIGNED)
    return pid, t, offs, mask


@triton.jit
def block_elements(b, numels, block_tensor, block_start, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """(tensor, offsets, mask) of block ``b`` of the geometry: what ``program_elements`` gives program
    ``b``, for kernels whose programs loop over several blocks (``common.until_known``)."""
    t = tl.load(block_tensor + b)
    start = tl.load(block_start + b)
    n = tl.load(numels + t)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
        n = tl.multiple_of(n, 16)
    offs = start + tl.arange(0, BLOCK)
    return t, offs, offs < n


@triton.jit
def tensor_ptr(ptrs, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s data pointer from a pointer table, typed ``DTYPE`` (16-byte aligned under ``ALIGNED``)."""
    ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _segment_reduce_kernel(partials, block_first, out, K: tl.constexpr, MAX_MASK: tl.constexpr,
                           CHUNK: tl.constexpr):
    """out[s, k] = the fp64 sum (or, for the columns set in MAX_MASK, the max) of partials[b, k] over
    the rows b of segment s, ``[block_first[s], block_first[s + 1])``. Lanes accumulate in a fixed order
    and finish with a fixed tree, so the result is the same on every run."""
    s = tl.program_id(0)
    lo = tl.load(block_first + s)
    hi = tl.load(block_first + s + 1)
    for k in tl.static_range(K):
        # a compile-time value (MAX_MASK and k are): no `: tl.constexpr` annotation, which Triton >= 3.6
        # rejects inside a static_range body ("constexpr cannot be reassigned")
        is_max = (MAX_MASK >> k) & 1
        if is_max:
            acc = tl.full((CHUNK,), float("-inf"), dtype=tl.float64)
        else:
            acc = tl.zeros((CHUNK,), dtype=tl.float64)
        # a while loop, not range(lo, hi, CHUNK): Triton 3.6's interpreter cannot take loaded bounds there
        b0 = lo
        while b0 < hi:
            idx = b0 + tl.arange(0, CHUNK)
            inside = idx < hi
            if is_max:
                v = tl.load(partials + idx.to(tl.int64) * K + k, mask=inside, other=float("-inf"))
                acc = tl.maximum(acc, v.to(tl.float64))
            else:
                v = tl.load(partials + idx.to(tl.int64) * K + k, mask=inside, other=0.0)
                acc += v.to(tl.float64)
            b0 += CHUNK
        if is_max:
            tl.store(out + s * K + k, tl.max(acc, axis=0))
        else:
            tl.store(out + s * K + k, tl.sum(acc, axis=0))


# A program of the reduction walks its rows REDUCE_LANES at a time, one L2 round trip per step. Up to
# REDUCE_ROWS rows per tensor that is one launch; longer tensors (a 65M-element embedding has 32,000
# blocks) are reduced in two: chunks of REDUCE_ROWS rows in parallel, then each tensor's chunk sums.
REDUCE_LANES = 512
REDUCE_ROWS = 2048


@dataclass(frozen=True)
class ReductionChunks:
    """Segments of at most REDUCE_ROWS block rows, none spanning two tensors: the first level of a long
    per-tensor reduction."""
    first: torch.Tensor  # int32 (chunks + 1,): the first block row of every chunk, and the end
    tensor_first: torch.Tensor  # int32 (tensors + 1,): the first chunk of every tensor, and the end
    n_chunks: int


def _reduction_chunks(block_first: list[int], device: torch.device) -> ReductionChunks | None:
    if max(b - a for a, b in zip(block_first, block_first[1:])) <= REDUCE_ROWS:
        return None
    first, tensor_first = [], [0]
    for lo, hi in zip(block_first, block_first[1:]):
        first.extend(range(lo, hi, REDUCE_ROWS))
        tensor_first.append(len(first))
    first.append(block_first[-1])
    return ReductionChunks(_to_device(first, torch.int32, device), _to_device(tensor_first, torch.int32, device),
                           len(first) - 1)


def per_tensor(partials: torch.Tensor, geo: Geometry, max_columns: Sequence[int] = ()) -> torch.Tensor:
    """(tensors, K) fp64 reduction of the per-block partials: sums, or maxima for ``max_columns``."""
    k = partials.shape[1]
    mask = sum(1 << c for c in max_columns)
    chunks = geo.reduction
    if chunks is not None:
        rows = torch.empty((chunks.n_chunks, k), dtype=torch.float64, device=partials.device)
        launch(_segment_reduce_kernel, (chunks.n_chunks,), partials, chunks.first, rows, K=k, MAX_MASK=mask,
               CHUNK=REDUCE_LANES)
        partials, bounds = rows, chunks.tensor_first
    else:
        bounds = geo.block_first
    out = torch.empty((geo.n_tensors, k), dtype=torch.float64, device=partials.device)
    launch(_segment_reduce_kernel, (geo.n_tensors,), partials, bounds, out, K=k, MAX_MASK=mask, CHUNK=REDUCE_LANES)
    return out
