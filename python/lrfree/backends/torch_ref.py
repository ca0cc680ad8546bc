"""Plain-PyTorch building blocks of the reference backend.

The reference backend is written for exactness: fp64 accumulation of every reduction, predicated writes
so that a skipped step leaves parameters and state bit-identical, and element-wise formulas written with
the same torch ops the reference packages use. The fused backends are tested against it.

It is also what ``backend="auto"`` runs on a CPU, so it avoids per-tensor Python loops: a step's tensors
are cut into :class:`Chunk` s (one param group and one storage dtype each), and a method's pass runs its
formulas once per chunk on (rows, width) matrices that hold every tensor of the chunk (see
:class:`Chunk`). Element by element the ops are the per-tensor formulas, so the values are the same; only
the order in which a tensor's fp64 reductions add up differs from a single ``sum()`` over it (for fp64
parameters not even that: they reduce tensor by tensor with the reference packages' own ops).
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Callable, Sequence

import torch

from .. import precision

F64 = torch.float64


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """Element-wise math runs in fp32 for fp32/bf16/fp16 storage and in fp64 for fp64 storage."""
    return F64 if p.dtype == F64 else torch.float32


def up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in the compute dtype of parameter ``like`` (a no-op when it already is)."""
    return t.to(compute_dtype(like))


def commit_(dst: torch.Tensor, new: torch.Tensor, ok: torch.Tensor) -> None:
    """Store ``new`` into ``dst`` if the step is accepted, else leave ``dst`` exactly as it was.

    ``torch.where`` never mixes the two, so NaNs in a rejected ``new`` cannot leak into ``dst``; a
    low-precision ``dst`` upcast and rounded back is bit-identical.
    """
    dst.copy_(torch.where(ok, new, dst))


# Fused multiply-adds, rounded exactly like torch's ``add(alpha=)``, ``addcmul`` and ``addcdiv`` kernels
# (which use FMA) even when the coefficient is a device scalar; the reference packages are written with
# those ops, and matching their rounding keeps fp64 oracle comparisons tight through chaotic phases.
Coef = float | torch.Tensor


def axpy(a: torch.Tensor, b: torch.Tensor, alpha: Coef) -> torch.Tensor:
    """``a + alpha * b`` as ``torch.add(a, b, alpha=alpha)``."""
    if isinstance(alpha, torch.Tensor):
        return torch.addcmul(a, b, alpha)
    return torch.add(a, b, alpha=alpha)


def addcmul(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, value: Coef) -> torch.Tensor:
    """``x + value * a * b`` as ``torch.addcmul``."""
    if isinstance(value, torch.Tensor):
        return torch.addcmul(x, a * value, b)
    return torch.addcmul(x, a, b, value=value)


def addcdiv(x: torch.Tensor, num: torch.Tensor, den: torch.Tensor, value: Coef) -> torch.Tensor:
    """``x + value * num / den`` as ``torch.addcdiv``."""
    if isinstance(value, torch.Tensor):
        return torch.addcdiv(x, num * value, den)
    return torch.addcdiv(x, num, den, value=value)


def sumsq(t: torch.Tensor) -> torch.Tensor:
    t = t.to(F64)
    return (t * t).sum()


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.dot(a.to(F64).reshape(-1), b.to(F64).reshape(-1))


def l1(t: torch.Tensor) -> torch.Tensor:
    return t.to(F64).abs().sum()


def safe_div(num: torch.Tensor, den: torch.Tensor, fallback: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else ``fallback``: the device form of a guarded division."""
    den_pos = den > 0
    quotient = num / torch.where(den_pos, den, torch.ones_like(den))
    # a device fill, not a host-to-device copy: steps must stay capturable in CUDA graphs
    other = fallback if isinstance(fallback, torch.Tensor) else torch.full_like(quotient, fallback)
    return torch.where(den_pos, quotient, other)


def sgd_apply_(batch, coef: torch.Tensor, decay: torch.Tensor | None = None,
               copy_best: torch.Tensor | None = None) -> None:
    """``x ← x − coef_i (g_i + decay_i x_i)`` for every active tensor, committed only if the step is
    accepted; with ``copy_best``, ``state['best'] ← x`` first where that flag is set. The reference of
    ``lrfree.kernels.sgd.sgd_apply``."""
    for c in chunks(batch):
        x = c.params
        if copy_best is not None:
            c.commit_state("best", x, copy_best)
        d = c.grads if decay is None else axpy(c.grads, x, c.per_tensor(decay))
        c.commit_params(axpy(x, d, -c.per_tensor(coef)), batch.ok)


# ---------------------------------------------------------------------------------------------- chunks
# Why chunks, measured on the 148 tensors of a GPT-2-shaped model (0.75M fp32 elements, 2 CPU threads): an
# element-wise op costs ~3 µs of dispatch per tensor, so a per-tensor loop spends ~0.45 ms per op of its
# formula where the arithmetic takes 0.03 ms, and torch's ``_foreach_*`` ops (on a CPU a C++ loop over the
# same per-tensor kernels) still 0.15-0.35 ms. Copying the tensors into one buffer costs 0.1-0.14 ms (one
# ``_foreach_copy_`` into views of it); after that each op of the formula costs 0.03-0.1 ms for all of
# them together. On that model the per-tensor loops took 4.1x (AdamW) and 16x (PS-DA-SGD) the time of
# torch.optim.AdamW(foreach=True); chunks take 1.3x and 2.3x.
WIDTH = 64  # elements per row of a packed matrix: padding is < 64 elements per tensor
# a tensor at least this large (and contiguous) is a chunk of its own, used in place: copying it would cost
# more than the dispatch it saves, and a large model's big tensors are then never copied (a packed chunk
# keeps a copy of its parameters and of its gradients from step to step)
ALONE = 1 << 18
# a packed chunk holds at most this many elements: a formula's temporaries (1 MB each in fp32) stay in the
# caches; measured on the GPT-2-shaped model, 2^18 was fastest among 2^17 ... 2^22 for every method
PACK_LIMIT = 1 << 18


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def select_(dst: torch.Tensor, new: torch.Tensor, ok: torch.Tensor) -> None:
    """``dst ← new`` if the 0-d bool ``ok``, else unchanged, bit for bit: what :func:`commit_` does with
    ``torch.where``, on the values' bit patterns read as integers, m·new + (1 − m)·dst with m = ``ok`` ∈
    {0, 1}. One of the two terms is 0, so the sum is exact, and NaNs in a rejected ``new`` are only bits
    multiplied by 0. Measured on 0.75M fp32 elements (1 thread): 0.09 ms, where ``torch.where`` (not
    vectorized for a 0-d condition) takes 0.32 ms."""
    ints = _BITS[dst.dtype]
    m = ok.to(ints)
    _select_bits_(dst, new, m, 1 - m)


def _select_bits_(dst: torch.Tensor, new: torch.Tensor, m: torch.Tensor, not_m: torch.Tensor) -> None:
    ints = _BITS[dst.dtype]
    dst.view(ints).mul_(not_m).addcmul_(new.to(dst.dtype).contiguous().view(ints), m)


_malloc_tuned = False


def _keep_freed_memory(device: torch.device) -> None:
    """Once per process: free one 31 MB block, which raises glibc malloc's adaptive thresholds to their
    maximum (blocks up to 32 MB come from the heap, and up to 64 MB of freed heap stay mapped), as freeing
    any large tensor does (a training step's activations, say). Before that, the MB-sized temporaries of a
    step are handed back to the OS when freed and their pages faulted in again at the next step: measured
    on the GPT-2-shaped model, up to 6,000 page faults and 60% of a step. Elsewhere than glibc this is an
    allocation and a free, nothing else."""
    global _malloc_tuned
    if not _malloc_tuned and device.type == "cpu":
        _malloc_tuned = True
        del_me = torch.empty(31 << 18, dtype=torch.float32)  # never touched: no page is mapped
        del del_me


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # as FusedOptimizer._coefficient_vector: a pinned, asynchronous copy, so CUDA steps never synchronize
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


class Layout:
    """Where the tensors of one chunk sit in its (rows, width) matrices; it keeps the step's loaded matrices.

    Packed: tensor i takes ⌈numel_i / WIDTH⌉ whole rows of a (rows, WIDTH) matrix, so a per-tensor scalar is
    a (rows, 1) column and a per-tensor sum a sum of row sums; the padding after a tensor's last element is
    zero in loaded matrices and left out of every reduction. Loaded matrices live in buffers kept from step
    to step, with their views: making a view per tensor every step would cost as much as the copy itself.
    Alone: one contiguous tensor seen as a (1, numel) matrix, in place.

    Within a step a matrix is loaded once per name (the same tensors may be asked for by several passes,
    and by a batch and its subsets) and a commit writes into it, so later loads see the committed values,
    as they would reading the tensors themselves.

    Optimizer state is not copied at all: a packed chunk's state tensors (of the compute dtype) are made
    views of one kept matrix per key (:meth:`state`), which then is their storage, read and committed in
    place. Measured on the GPT-2-shaped model, that saves AdamW four of its seven copies per step
    (m and v in and out), COCOB nine of twelve. ``optimizer.state`` keeps a tensor per parameter and key,
    each of the parameter's shape; a state tensor replaced from outside (``load_state_dict``) is found
    not to be the matrix's view at the next step and copied into it.
    """

    def __init__(self, shapes: Sequence[torch.Size], device: torch.device, packed: bool, shared: dict):
        _keep_freed_memory(device)
        self.shapes, self.device, self.packed = list(shapes), device, packed
        self._shared = shared  # what all layouts of an optimizer share (the reduction scratch)
        numels = [math.prod(s) for s in shapes]
        rows = [-(-n // WIDTH) for n in numels] if packed else [1]
        first = list(itertools.accumulate(rows, initial=0))[:-1]
        self.numels, self.offsets = numels, [r * WIDTH for r in first]
        self.n_rows = sum(rows)
        pads = [o + j for o, n, r in zip(self.offsets, numels, rows) for j in range(n, r * WIDTH)] if packed else []
        self.pads = _to_device(torch.tensor(pads, dtype=torch.long), device)  # where the padding is
        host_rows = torch.tensor(rows, dtype=torch.long)
        row_tensor = torch.repeat_interleave(torch.arange(len(rows)), host_rows)
        self.rows = _to_device(host_rows, device)  # rows per tensor: the segment lengths of row reductions
        self.row_tensor = _to_device(row_tensor, device)  # which tensor each row belongs to
        # the index, within its tensor, of each row's first element (stochastic rounding draws by it)
        row_start = (torch.arange(self.n_rows) - torch.tensor(first, dtype=torch.long)[row_tensor]) * WIDTH
        self.row_start = _to_device(row_start.reshape(-1, 1), device)
        self._buffers: dict[tuple, tuple[torch.Tensor, dict]] = {}
        self._element_index: torch.Tensor | None = None
        self.sliced: dict[int, Layout] = {}  # the layouts of Chunk.every
        self.take_index: torch.Tensor | None = None
        self._step: object = None
        self._loaded: dict[str, tuple[torch.Tensor, list[torch.Tensor] | None, bool]] = {}
        self._masks: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._homes: dict[tuple[str, bool], tuple[torch.Tensor, list[torch.Tensor]]] = {}
        # the rows where a tensor ends before the row does, and which of their elements are the tensor's
        partial = [(f + r - 1, n - (r - 1) * WIDTH) for f, n, r in zip(first, numels, rows) if packed and n % WIDTH]
        self.partial_rows = _to_device(torch.tensor([r for r, _ in partial], dtype=torch.long), device)
        self.partial_mask = _to_device(torch.arange(WIDTH) < torch.tensor([k for _, k in partial],
                                                                          dtype=torch.long).reshape(-1, 1), device)

    def element_index(self, width: int) -> torch.Tensor:
        """(rows, width) int32: each element's position within its tensor, the index stochastic rounding
        draws its bits by (kept: it depends on the layout only)."""
        index = self._element_index
        if index is None or index.shape[1] != width:
            index = self._element_index = as_int32(self.row_start + torch.arange(width, device=self.device))
        return index

    def views(self, matrix: torch.Tensor, flat: bool = False) -> list[torch.Tensor]:
        """One view of ``matrix`` per tensor, shaped like its parameter (``flat``: 1-d)."""
        storage = matrix.view(-1)
        return [storage[o:o + n].view((n,) if flat else shape)
                for o, n, shape in zip(self.offsets, self.numels, self.shapes)]

    def _views(self, slot: int, dtype: torch.dtype, flat: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        buffer = self._buffers.get((slot, dtype))
        if buffer is None:
            matrix = torch.zeros(self.n_rows, WIDTH, dtype=dtype, device=self.device)
            buffer = self._buffers[(slot, dtype)] = (matrix, {})
        matrix, views = buffer
        if flat not in views:
            views[flat] = self.views(matrix, flat)
        return matrix, views[flat]

    def scratch(self) -> torch.Tensor:
        """A kept fp64 matrix for the in-place ops of a reduction (its contents are the caller's until the
        next call): one buffer for all chunks of the optimizer, which reduce one after the other."""
        key, n = ("reduction scratch", self.device), self.n_rows * WIDTH
        buffer = self._shared.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = self._shared[key] = torch.empty(n, dtype=F64, device=self.device)
        return buffer[:n].view(self.n_rows, WIDTH)

    def _begin(self, step: object) -> None:
        if self._step is not step:  # a new step: forget the last one's matrices
            self._step, self._loaded, self._masks = step, {}, {}

    def loaded(self, step: object, name: str) -> torch.Tensor | None:
        """The matrix loaded as ``name`` in this step, if any."""
        self._begin(step)
        hit = self._loaded.get(name)
        return None if hit is None else hit[0]

    def state(self, step: object, key: str, items: list, dtype: torch.dtype, flat: bool = False) -> torch.Tensor:
        """The matrix of the items' ``state[key]``: in a packed chunk the kept matrix the state tensors are
        views of (made so if they are not, or no longer, its views), else loaded as :meth:`load` does."""
        self._begin(step)
        name = "state:" + key
        hit = self._loaded.get(name)
        if hit is not None:
            return hit[0]
        tensors = [it.state[key] for it in items]
        if self.packed:
            home = self._homes.get((key, flat))
            if home is None or not all(map(operator.is_, tensors, home[1])):
                home = self._adopt(key, items, tensors, flat)
            if home is not None:
                matrix = home[0]
                if matrix.dtype == dtype:
                    self._loaded[name] = (matrix, None, True)  # commits write in place
                else:  # state kept in the parameter's dtype (x0 of bf16 parameters): one conversion
                    self._loaded[name] = (matrix.to(dtype), matrix, False)  # commits write back into it
                return self._loaded[name][0]
        return self.load(step, name, tensors, dtype, flat)

    def _adopt(self, key: str, items: list, tensors: list[torch.Tensor],
               flat: bool) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
        # only state of one dtype, dense in the parameter's order (a channels_last state tensor keeps its own
        # layout: the fused kernels need state and parameter in one memory layout)
        dtype = tensors[0].dtype if tensors else torch.float32
        matrix = torch.zeros(self.n_rows, WIDTH, dtype=dtype, device=self.device)
        views = self.views(matrix, flat)
        if not all(t.dtype == dtype and t.is_contiguous() and t.shape == v.shape for t, v in zip(tensors, views)):
            self._homes.pop((key, flat), None)
            return None
        torch._foreach_copy_(views, tensors)
        for it, view in zip(items, views):
            it.state[key] = view
        self._homes[(key, flat)] = (matrix, views)
        return matrix, views

    def load(self, step: object, name: str, tensors: list[torch.Tensor], dtype: torch.dtype,
             flat: bool = False) -> torch.Tensor:
        self._begin(step)
        hit = self._loaded.get(name)
        if hit is not None:
            return hit[0]
        if self.packed:
            matrix, views = self._views(len(self._loaded), dtype, flat)
            torch._foreach_copy_(views, tensors)
            self._loaded[name] = (matrix, views, False)
        else:
            t = tensors[0]
            matrix = t.to(dtype).reshape(1, -1)
            self._loaded[name] = (matrix, None, t.dtype == dtype and t.is_contiguous())  # aliased: in place
        return matrix

    def commit(self, step: object, name: str, tensors: list[torch.Tensor], new: torch.Tensor, ok: torch.Tensor,
               dtype: torch.dtype, flat: bool = False) -> None:
        old = self.load(step, name, tensors, dtype, flat)
        ints = _BITS[old.dtype]
        masks = self._masks.get((id(ok), ints))  # select_'s m and 1 − m, once per step and flag
        if masks is None or masks[0] is not ok:
            m = ok.to(ints)
            masks = self._masks[(id(ok), ints)] = (ok, m, 1 - m)
        _select_bits_(old, new, masks[1], masks[2])
        _, into, in_place = self._loaded[name]
        if isinstance(into, list):  # a packed copy: back into the tensors
            torch._foreach_copy_(tensors, into)
        elif into is not None:  # a converted copy of a kept matrix of another dtype
            into.copy_(old)
        elif not in_place:  # a chunk alone, converted or made contiguous
            tensors[0].copy_(old.view(tensors[0].shape))


class Chunk:
    """Some of a step's tensors — one param group, one storage dtype — and the (rows, width) matrices of
    their values, in the compute dtype. A method's pass is its per-tensor formula applied to these
    matrices: element-wise ops are the same ops on the same values, per-tensor scalars become
    :meth:`per_tensor` columns, per-tensor fp64 reductions :meth:`dot`, :meth:`sumsq` ... vectors, and
    writes go through :meth:`commit` (predicated on the step's accept flag, as :func:`commit_`)."""

    def __init__(self, batch, positions: list[int], layout: Layout, index: torch.Tensor | None = None):
        self.batch, self.layout, self.positions = batch, layout, positions
        self.items = [batch.items[i] for i in positions]
        self.group = self.items[0].group
        self.dtype = compute_dtype(self.items[0].p)
        # the chunk's tensors among the batch's items
        self.index = batch.index(positions) if index is None else index
        self._row_items: torch.Tensor | None = None
        self.step = 1  # sliced from another chunk: every step-th element (see every)

    def __len__(self) -> int:
        return len(self.items)

    # -- values --------------------------------------------------------------------------------------
    def load(self, name: str, tensors: list[torch.Tensor], flat: bool = False) -> torch.Tensor:
        """The matrix of ``tensors`` (one per item, shaped like its parameter, or 1-d of its size with
        ``flat``) in the compute dtype; read-only (write through :meth:`commit`)."""
        return self.layout.load(self.batch.inputs, name, tensors, self.dtype, flat)

    @property
    def params(self) -> torch.Tensor:
        hit = self.layout.loaded(self.batch.inputs, "params")
        return self.load("params", [it.p for it in self.items]) if hit is None else hit

    @property
    def grads(self) -> torch.Tensor:
        hit = self.layout.loaded(self.batch.inputs, "grads")
        return self.load("grads", [it.g for it in self.items]) if hit is None else hit

    def state(self, key: str, flat: bool = False) -> torch.Tensor:
        """The items' ``state[key]`` (in place: see :class:`Layout`), read-only as :meth:`load`."""
        return self.layout.state(self.batch.inputs, key, self.items, self.dtype, flat)

    def per_tensor(self, values: torch.Tensor) -> torch.Tensor:
        """A (rows, 1) column of per-item values (one per item of the *batch*, fp64) in the compute dtype:
        multiplying by it is multiplying each tensor by its own 0-d value."""
        if self._row_items is None:
            self._row_items = self.index.index_select(0, self.layout.row_tensor)
        return values.index_select(0, self._row_items).to(self.dtype).unsqueeze(1)

    # -- writes --------------------------------------------------------------------------------------
    def commit(self, name: str, tensors: list[torch.Tensor], new: torch.Tensor, ok: torch.Tensor,
               flat: bool = False) -> None:
        """``tensors ← new`` if the step is accepted, else unchanged (bit for bit)."""
        self.layout.commit(self.batch.inputs, name, tensors, new, ok, self.dtype, flat)

    def commit_state(self, key: str, new: torch.Tensor, ok: torch.Tensor, flat: bool = False) -> None:
        """The items' ``state[key]`` ← ``new`` (committed as :meth:`commit`). State stored in bf16 under
        ``state_dtype`` (lrfree.precision) is written by stochastic rounding with the key's own bits, as
        the fused kernels' ``to_state`` writes it."""
        self.state(key, flat)  # the matrix a commit writes into
        tensors = [it.state[key] for it in self.items]
        if tensors[0].dtype == torch.bfloat16 and key in type(self.batch.optimizer).low_precision_state:
            new = self._stochastic_bf16(new, precision.salt(key)).to(self.dtype)
        self.commit("state:" + key, tensors, new, ok, flat)

    def commit_params(self, new: torch.Tensor, ok: torch.Tensor) -> None:
        """The parameters ← ``new`` (committed as :meth:`commit`), rounded as the reference rounds a new
        parameter value: stochastically to bf16 under ``stochastic_rounding``, else to nearest by the
        store."""
        if self.batch.optimizer.stochastic_rounding and self.items[0].p.dtype == torch.bfloat16:
            new = self._stochastic_bf16(new)
        self.commit("params", [it.p for it in self.items], new, ok)

    def _stochastic_bf16(self, new: torch.Tensor, salt: int | None = None) -> torch.Tensor:
        """``new`` stochastically rounded to bf16 with the bits the fused kernels draw: each tensor's own seed
        (salted for a state key), indexed by the element's position in the tensor."""
        seeds = self.batch.sr_seeds.index_select(0, self.index)  # the step's seeds, drawn once per step
        if salt is not None:
            seeds = mix32(seeds ^ salt)
        return stochastic_round_bf16(new, seeds.index_select(0, self.layout.row_tensor).unsqueeze(1),
                                     self.layout.element_index(new.shape[1]))

    # -- per-tensor fp64 reductions: (len(chunk),) vectors -------------------------------------------
    # In fp32 (and bf16/fp16) a tensor's sum is a sum of row sums, fp64 all the way, in another order than
    # one sum() over the tensor. Products and squares are formed in fp64 too (exact for fp32 values, as
    # dot() of fp64 copies): formed in fp32, as the fused kernels form them, they were half the time but
    # put SPS's 20-step fp32 trajectory 2.6× further from the fp64 oracle than the fp32 reference package
    # (the accuracy rule allows 2×). fp64 parameters reduce tensor by tensor with the ops the reference
    # packages use (torch.dot, sum()), which reproduces their per-tensor values bit for bit: the fp64 oracle
    # tests follow chaotic trajectories (Prodigy's d) for 200 steps at 1e-10, and a last-bit difference in
    # one tensor's ⟨g, p0 − x⟩ grew to 3.5e-9 there by step 49.
    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Σ of each tensor's ``values``, accumulated in fp64 (``values.to(F64).sum()`` per tensor)."""
        if self.dtype == F64:
            return self._each(lambda v: v.sum(), values)
        return self._sums(values)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.dtype == F64:
            return self._each(dot, a, b)
        return self._sums(self._fp64(a).mul_(b), fresh=True)

    def sumsq(self, t: torch.Tensor) -> torch.Tensor:
        if self.dtype == F64:
            return self._each(sumsq, t)
        return self._sums(self._fp64(t).square_(), fresh=True)

    def l1(self, t: torch.Tensor) -> torch.Tensor:
        if self.dtype == F64:
            return self._each(l1, t)
        return self._sums(t.abs())

    def _each(self, reduce: Callable[..., torch.Tensor], *matrices: torch.Tensor) -> torch.Tensor:
        if not self.items:
            return torch.zeros(0, dtype=F64, device=self.batch.device)
        return torch.stack([reduce(*views) for views in zip(*(self.unpacked(m) for m in matrices))])

    def _fp64(self, values: torch.Tensor) -> torch.Tensor:
        # an fp64 copy of ``values`` for the in-place ops of a reduction: in a packed chunk the kept scratch
        # matrix. Not allocating it matters: 2 MB temporaries freed each time were handed back to the OS by
        # malloc and their pages faulted in again at the next reduction (PS-DA-SGD: ~10k page faults per
        # step, 60% of its time)
        if not self.layout.packed:
            return values.to(F64, copy=True)
        return self.layout.scratch().copy_(values)

    def _sums(self, values: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        # each tensor's fp64 sum of a matrix of this chunk (``sum(dtype=F64)`` of fp32 values adds them in
        # fp64, bit for bit as the sum of an fp64 copy, without the copy), its padding (whatever the formula
        # made of the zeros there) left out: zeroed in place in a ``fresh`` matrix (the reduction's own
        # scratch: one op), else a row a tensor ends in before the row does is summed again over the
        # tensor's elements only (at most one row per tensor; four small ops)
        if not self.layout.packed:
            return values.sum(1, dtype=F64)
        layout = self.layout
        if fresh:
            values.view(-1).index_fill_(0, layout.pads, 0.0)
        rows = values.sum(1, dtype=F64)
        if not fresh and len(layout.partial_rows):
            tail = torch.where(layout.partial_mask, values.index_select(0, layout.partial_rows), 0.0)
            rows.index_copy_(0, layout.partial_rows, tail.sum(1, dtype=F64))
        return torch.segment_reduce(rows, "sum", lengths=layout.rows)

    def amax(self, values: torch.Tensor) -> torch.Tensor:
        """Each tensor's largest value (-inf for a tensor without elements)."""
        if not self.layout.packed:
            return values.amax(1) if values.numel() else values.new_full((1,), -math.inf)
        layout = self.layout
        rows = values.amax(1)
        if len(layout.partial_rows):  # a tensor's last row, if it ends before the row does: its elements only
            tail = torch.where(layout.partial_mask, values.index_select(0, layout.partial_rows), -math.inf)
            rows.index_copy_(0, layout.partial_rows, tail.amax(1))
        return torch.segment_reduce(rows, "max", lengths=layout.rows)

    def every(self, step: int) -> "Chunk":
        """The chunk of every ``step``-th element of each tensor, flattened (Prodigy's ``slice_p``): the same
        items, loading tensors of that size (``flat``); :meth:`take` selects those elements of a matrix of
        this chunk. ``step`` = 1 is this chunk."""
        if step == 1:
            return self
        layout = self.layout.sliced.get(step)
        if layout is None:
            parent = self.layout
            layout = Layout([torch.Size([-(-n // step)]) for n in parent.numels], parent.device, parent.packed,
                            parent._shared)
            if parent.packed:  # element k of sliced tensor i is element k·step of tensor i (padding: any)
                index = torch.zeros(layout.n_rows * WIDTH, dtype=torch.long)
                for o, n, o_sub, n_sub in zip(parent.offsets, parent.numels, layout.offsets, layout.numels):
                    index[o_sub:o_sub + n_sub] = torch.arange(o, o + n, step)
                layout.take_index = _to_device(index, parent.device)
            parent.sliced[step] = layout
        sliced = Chunk(self.batch, self.positions, layout)
        sliced.step = step
        return sliced

    def take(self, matrix: torch.Tensor) -> torch.Tensor:
        """Of a matrix of the chunk this one was sliced from (:meth:`every`), this chunk's elements."""
        if self.step == 1:
            return matrix
        if not self.layout.packed:
            return matrix[:, ::self.step]
        return matrix.reshape(-1).index_select(0, self.layout.take_index).view(self.layout.n_rows, WIDTH)

    def unpacked(self, matrix: torch.Tensor) -> list[torch.Tensor]:
        """One view per tensor of a matrix of this chunk (shaped like the tensor's parameter)."""
        storage = matrix.reshape(-1)
        return [storage[o:o + n].view(shape) for o, n, shape in
                zip(self.layout.offsets, self.layout.numels, self.layout.shapes)]


def chunks(batch) -> list[Chunk]:
    """The step's tensors as chunks, built once per batch. Items of one param group and storage dtype are
    packed together (up to PACK_LIMIT elements a chunk); a large contiguous tensor is a chunk of its own.
    How a set of tensors is cut, and the chunks' layouts (with their buffers and the state they hold), are
    kept by the optimizer: a batch and its subsets (the same tensors) share the layouts."""
    cached = batch.__dict__.get("_chunks")
    if cached is not None:
        return cached
    # kept by the optimizer, rebuilt on use (copies and pickles start without them: state_dict._REBUILT_ON_USE)
    cache = batch.optimizer.__dict__.setdefault("_chunk_layouts", {})
    if len(cache) > 256:  # the set of tensors with gradients keeps changing: start over
        cache.clear()
    key = ("plan", batch.device,
           tuple((it.flat_index, it.group_index, it.p.shape, it.p.dtype, it.p.is_contiguous()) for it in batch.items))
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = _plan(batch, cache)
    parts, order = plan
    out = [Chunk(batch, positions, layout, index) for positions, layout, index in parts]
    batch.__dict__["_chunk_order"] = order
    batch.__dict__["_chunks"] = out
    return out


def _plan(batch, cache: dict) -> tuple[list[tuple[list[int], Layout, torch.Tensor]], torch.Tensor | None]:
    runs: dict[tuple, list[list[int]]] = {}
    alone: list[list[int]] = []
    sizes: dict[tuple, int] = {}
    for i, it in enumerate(batch.items):
        p = it.p
        n = p.numel()
        if n >= ALONE and p.is_contiguous():
            alone.append([i])
            continue
        key = (it.group_index, p.dtype)
        parts = runs.setdefault(key, [[]])
        if sizes.get(key, 0) + n > PACK_LIMIT and parts[-1]:
            parts.append([])
            sizes[key] = 0
        parts[-1].append(i)
        sizes[key] = sizes.get(key, 0) + n
    out = []
    for positions, packed in [(p, True) for parts in runs.values() for p in parts] + [(p, False) for p in alone]:
        items = [batch.items[i] for i in positions]
        key = ("layout", packed, items[0].p.dtype, batch.device, tuple((it.flat_index, it.p.shape) for it in items))
        layout = cache.get(key)
        if layout is None:
            layout = cache[key] = Layout([it.p.shape for it in items], batch.device, packed, cache)
        out.append((positions, layout, batch.index(positions)))
    # chunks list the items out of order when a group mixes dtypes or has a large tensor: per_item's permutation
    positions = [i for p, _, _ in out for i in p]
    order = (None if positions == list(range(len(positions))) else
             batch.index(sorted(range(len(positions)), key=positions.__getitem__)))
    return out, order


def per_item(batch, stats: Callable[[Chunk], torch.Tensor]) -> torch.Tensor:
    """``stats(chunk)`` ((len(chunk),) or (len(chunk), k) fp64) of every chunk, as one tensor in the batch's
    item order."""
    parts = chunks(batch)
    values = [stats(c) for c in parts]
    out = torch.cat(values) if len(values) > 1 else values[0]
    order = batch.__dict__["_chunk_order"]
    return out if order is None else out.index_select(0, order)


# ----------------------------------------------------------------------------------- stochastic rounding
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # lrfree.kernels.rounding.MIX


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixer of ``lrfree.kernels.rounding.mix32`` on int64 tensors holding uint32 values."""
    return _mix32_(as_int32(x).clone()).to(torch.int64) & _MASK32


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place on an int32 tensor holding the uint32 bits: the multiplication wraps modulo 2³²
    as the kernels' uint32 one does, and a shift right is masked to its 16 low bits, which makes the
    arithmetic shift of int32 a logical one."""
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF)).mul_(_MIX)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16).bitwise_and_(0xFFFF))


def stochastic_round_bf16(value: torch.Tensor, seed: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """``value`` (fp32) stochastically rounded to bf16 with the bits the fused kernels draw for a tensor
    whose step seed is ``seed`` (0-d int64): element i is dithered by ``mix32(i ^ seed) & 0xFFFF``.
    ``index`` (int64 or int32, broadcastable to ``value``; default: the element's position) and ``seed`` may
    also give each element its own index and seed (a chunk's matrix: per-row seeds, positions within each
    tensor).

    The hash runs on int32 in place (:func:`_mix32_`): on int64 with a mask after every operation it was 3×
    slower on a CPU, where a bf16-state Adam step on GPT-2's layout spent most of its time here."""
    if index is None:
        index = torch.arange(value.numel(), device=value.device, dtype=torch.int32).view(value.shape)
    x = torch.bitwise_xor(as_int32(index), as_int32(seed))
    if x.shape != value.shape:
        x = x.expand(value.shape).contiguous()
    _mix32_(x).bitwise_and_(0xFFFF)
    x.add_(value.to(torch.float32).contiguous().view(torch.int32)).bitwise_and_(-0x10000)  # & 0xFFFF0000
    # the low 16 bits are zero, so the conversion to bf16 is exact
    rounded = x.view(torch.float32).to(torch.bfloat16)
    return torch.where(value.isnan(), value.to(torch.bfloat16), rounded)


def as_int32(t: torch.Tensor) -> torch.Tensor:
    """An int64 tensor's low 32 bits as int32 (the uint32 value's bits); an int32 tensor as it is."""
    if t.dtype == torch.int32:
        return t
    low = t & _MASK32
    return torch.where(low >= 2**31, low - 2**32, low).to(torch.int32)


def step_seed(counter: torch.Tensor) -> torch.Tensor:
    """The step's base seed (0-d int64) from the optimizer's fp64 rounding-step counter."""
    return mix32((counter.to(torch.int64) * 0x2545F491) & _MASK32)


def tensor_seed(base: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    """Seeds of the tensors at ``flat_index`` (positions among all parameters) for a step's base seed."""
    return mix32(base ^ ((flat_index.to(base.device) * 0x27D4EB2F) & _MASK32))
