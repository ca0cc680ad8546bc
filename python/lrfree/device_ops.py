"""Device operations per optimizer step: the kernel launches and torch ops one ``step()`` issues (the
benchmark suite records them; tests hold every method to a budget).

Every torch operator that does work on the device counts (element-wise ops on 0-d scalars included:
on a GPU each is a launch of a few µs in series with the step); view and metadata operators (``view``,
``select``, ``as_strided``, ``detach`` ...) and bare allocations (``empty``) do not, since they launch
nothing. lrfree's own multi-tensor launches count once each, and the torch ops Triton's interpreter runs
inside a launch on a CPU are not counted. The count is the same on a CPU and on a GPU, so it is measured
wherever the suite runs.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that launch nothing: allocations without initialization and pure metadata.
_FREE = {"_record_function_enter", "_record_function_enter_new", "_record_function_exit", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_local_scalar_dense",
         "lift_fresh", "set_", "resize_", "is_nonzero", "_to_copy_noop", "record_stream", "sym_size",
         "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}


def _launches_nothing(func) -> bool:
    return func.is_view or func.overloadpacket.__name__ in _FREE


class DeviceOps(TorchDispatchMode):
    """Counts the device operations issued while active (``total``; ``by_name`` says which)."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter = Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not _launches_nothing(func):
            self.by_name[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def launching(self, kernel):
        self.by_name["<" + getattr(getattr(kernel, "fn", kernel), "__name__", "kernel") + ">"] += 1
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


@contextlib.contextmanager
def count_device_ops():
    """``with count_device_ops() as ops: opt.step(...)`` — then ``ops.total`` (``ops.by_name``: which)."""
    from lrfree.kernels import multi_tensor

    ops = DeviceOps()
    token = multi_tensor.launch_observer.set(ops.launching)
    try:
        with ops:
            yield ops
    finally:
        multi_tensor.launch_observer.reset(token)
