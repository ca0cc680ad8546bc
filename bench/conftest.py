"""Options and parametrization of the benchmark suite.

``--bench-mode``: ``full`` (LLM sizes, the default on a GPU), ``quick`` (narrow models, the default on a
CPU), ``check`` (bench/gpu_check.sh: the two LLM sizes the targets name, lrfree's fused backends against
torch's AdamW and three official packages, no sweep) or ``smoke`` (tiny; CI runs it with
``--benchmark-disable`` so the suite cannot rot). The Triton
backend is timed only on a GPU; in smoke mode on a CPU it runs in Triton's interpreter, for coverage.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before lrfree.kernels is imported (smoke mode)
    os.environ.setdefault("LRFREE_CUDA_HOST", "1")  # backend="cuda" through the extension's host build

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

import contenders as C  # noqa: E402
import environment  # noqa: E402
import workloads as W  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("lrfree benchmarks")
    group.addoption("--bench-mode", choices=W.MODES, default=None,
                    help="workload sizes (default: full on a GPU, quick on a CPU)")
    group.addoption("--bench-device", default=None, help="device to benchmark on (default: cuda if available)")
    group.addoption("--bench-only", default="",
                    help="comma-separated substrings: run only contenders whose name contains one of them")


def _settings(config):
    device = torch.device(config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = config.getoption("--bench-mode") or ("full" if device.type == "cuda" else "quick")
    return device, mode


def pytest_generate_tests(metafunc):
    device, mode = _settings(metafunc.config)
    only = [s for s in metafunc.config.getoption("--bench-only").split(",") if s]
    if "ops_case" in metafunc.fixturenames:  # every contender on every backend, counted once (not timed)
        every = [c for c in C.contenders(("torch", "triton", "cuda")) if not only or any(s in c.name for s in only)]
        metafunc.parametrize("ops_case", [(W.DEVICE_OPS, c) for c in every],
                             ids=[f"{W.DEVICE_OPS.label}/{c.name}" for c in every])
    if "case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    max_numel = environment.max_sweep_numel(device) if W.has_sweep(mode) else None
    for workload in W.workloads(mode, max_numel):
        if metafunc.function.__name__ == "test_copy":
            cases.append((workload, None))
            ids.append(f"{workload.label}/copy")
            continue
        for contender in C.contenders(C.backends_for(device, mode), sweep=workload.sweep, compact=mode == "check"):
            if only and not any(s in contender.name for s in only):
                continue
            cases.append((workload, contender))
            ids.append(f"{workload.label}/{contender.name}")
    metafunc.parametrize("case", cases, ids=ids)


@pytest.fixture(scope="session")
def bench_device(request):
    return _settings(request.config)[0]


@pytest.fixture(scope="session")
def bench_mode(request):
    return _settings(request.config)[1]


@pytest.fixture(scope="session")
def rounds(bench_mode):
    """(timed rounds, warm-up rounds) per benchmark."""
    return W.ROUNDS[bench_mode]


def pytest_benchmark_update_machine_info(config, machine_info):
    device, mode = _settings(config)
    machine_info["lrfree"] = {**environment.describe(device), "mode": mode}
