"""What the suite records besides time: host syncs per step, optimizer state and peak extra memory."""

from __future__ import annotations

import contextlib
import warnings

import torch

# Every way a Tensor hands a device value to the host.
SYNC_ENTRY_POINTS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu")


@contextlib.contextmanager
def count_host_reads(device: torch.device):
    """Counts calls of the Tensor methods that read a value of ``device`` back to the host.

    On CUDA only reads of CUDA tensors count (torch.optim keeps its step counters on the CPU on purpose,
    and reading those costs no sync), and ``torch.cuda.set_sync_debug_mode("warn")`` also counts the syncs
    torch performs internally (``nonzero``, boolean indexing, ...); the larger count is the number of
    host syncs the step costs. On a CPU every read counts: it is where a GPU would have to sync, except
    for torch.optim's CPU step counters, which the report flags.
    """
    counts = {"reads": 0, "cuda_syncs": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_ENTRY_POINTS}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            if self.device.type == device.type:
                counts["reads"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name in SYNC_ENTRY_POINTS:
        setattr(torch.Tensor, name, counting(name))
    cuda = device.type == "cuda"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
        counts["cuda_syncs"] = sum("synchroniz" in str(w.message) for w in caught)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_syncs(counts: dict) -> int:
    return max(counts["reads"], counts["cuda_syncs"])


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps (per-parameter state and scalars), each storage once."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.device, value.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    params = {id(p) for g in opt.param_groups for p in g["params"]}
    for key, value in opt.state.items():
        if id(key) in params:
            visit(value)
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak device memory a step allocates beyond what was live before it (CUDA only; None elsewhere)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.extra: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self._before
        return False
