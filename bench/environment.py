"""The machine a run measured: device, versions, and how large a workload fits."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re

import torch

PACKAGES = ("torch", "triton", "lrfree", "dadaptation", "prodigyopt", "dog-optimizer", "parameterfree",
            "pytorch_optimizer", "pytest-benchmark")

# Bytes per element a sweep point needs at worst: the master copy of params and grads (8), the
# contender's params and grads (8), Prodigy's four fp32 state tensors (16) and a reference package's
# temporaries (about two more tensors, 8).
SWEEP_BYTES_PER_ELEMENT = 40


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: torch.device) -> dict:
    info = {
        "device_type": device.type,
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{_cpu_model()} ({torch.get_num_threads()} threads)"),
        "python": platform.python_version(),
        "versions": {name: v for name in PACKAGES if (v := _version(name)) is not None},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def max_sweep_numel(device: torch.device) -> int:
    """The largest element count the scaling sweep may allocate on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(0.8 * free / SWEEP_BYTES_PER_ELEMENT)


def results_dir(device: torch.device, mode: str) -> str:
    """``bench/results/<device>-<mode>``: where a run on this device and mode keeps its files."""
    slug = re.sub(r"[^a-z0-9]+", "-", describe(device)["device"].lower()).strip("-")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{slug}-{mode}")
