"""One optimizer step per contender per workload, timed side by side in one run.

Each benchmark times ``step()`` followed by a device synchronize (what a training loop waits for), from
the same parameters and the same random gradients for every contender. Before timing it takes one step
(lazy state creation), then one step counting host syncs, one measuring peak extra memory and one counting
device operations (``lrfree.device_ops``: kernel launches and torch ops, each a launch on a GPU); after
timing it checks that the parameters are still finite and that an lrfree optimizer skipped no step, so a
fast-but-wrong contender cannot slip into the table. ``extra_info`` carries what the report needs.
"""

from __future__ import annotations

import gc

import pytest
import torch

import measure
import roofline
from lrfree.device_ops import count_device_ops
from contenders import Contender
from workloads import Materialized, Workload

_live: dict = {"key": None, "data": None}


def materialize(workload: Workload, device: torch.device) -> Materialized:
    """The workload's tensors, kept while consecutive benchmarks use the same workload."""
    if _live["key"] != (workload, device):
        _live["key"], _live["data"] = None, None
        release(device)
        _live["data"] = Materialized(workload, device)
        _live["key"] = (workload, device)
    return _live["data"]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def describe(benchmark, workload: Workload, contender: str, method: str, family: str, backend: str,
             state_bytes: int = 4) -> None:
    benchmark.group = workload.label
    benchmark.extra_info.update({
        "workload": workload.label, "workload_name": workload.name, "sweep": workload.sweep,
        "dtype": workload.dtype_name, "numel": workload.numel, "n_tensors": len(workload.shapes),
        "contender": contender, "method": method, "family": family, "backend": backend,
        "state_bytes_per_statistic": state_bytes,
        "bytes_per_element": roofline.minimal_bytes(method, workload.param_bytes if method != "copy" else 4,
                                                    state_bytes),
    })


def test_copy(benchmark, case, bench_device, rounds):
    """The bandwidth every roofline percentage of this workload is measured against."""
    workload, _ = case
    src = torch.randn(workload.numel, device=bench_device)
    dst = torch.empty_like(src)
    describe(benchmark, workload, "copy", "copy", "copy", "")

    def run():
        dst.copy_(src)
        measure.synchronize(bench_device)

    benchmark.pedantic(run, rounds=rounds[0], warmup_rounds=rounds[1], iterations=1)
    assert torch.equal(dst, src)


def test_step(benchmark, case, bench_device, rounds):
    workload, contender = case
    contender: Contender
    reason = contender.unavailable()
    if reason:
        pytest.skip(reason)
    data = materialize(workload, bench_device)
    params = data.fresh_params()
    try:
        opt = contender.make(params)
        contender.step(opt, data.loss)
        measure.synchronize(bench_device)
    except Exception as exc:  # a reference package that does not support this dtype, say
        if contender.family == "lrfree":
            raise
        pytest.skip(f"{contender.name} fails on {workload.label}: {type(exc).__name__}: {exc}")

    with measure.count_host_reads(bench_device) as counts:
        contender.step(opt, data.loss)
        measure.synchronize(bench_device)
    with measure.PeakMemory(bench_device) as peak:
        contender.step(opt, data.loss)
    with count_device_ops() as ops:
        contender.step(opt, data.loss)

    describe(benchmark, workload, contender.name, contender.method, contender.family, contender.backend,
             contender.state_bytes)
    fused = (roofline.fused_bytes(contender.method, workload.param_bytes, contender.state_bytes)
             if contender.backend in ("triton", "cuda") else None)
    benchmark.extra_info.update({
        "implemented_bytes_per_element": fused,
        "host_syncs_per_step": measure.host_syncs(counts),
        "device_ops_per_step": ops.total,
        "state_bytes_per_param": measure.state_bytes(opt) / workload.numel,
        "peak_extra_bytes_per_param": None if peak.extra is None else peak.extra / workload.numel,
    })

    def run():
        contender.step(opt, data.loss)
        measure.synchronize(bench_device)

    benchmark.pedantic(run, rounds=rounds[0], warmup_rounds=rounds[1], iterations=1)

    finite = all(bool(torch.isfinite(p).all()) for p in params)
    benchmark.extra_info["finite"] = finite
    if contender.family != "official":
        assert finite, f"{contender.name} produced non-finite parameters on {workload.label}"
    if contender.family == "lrfree":
        assert float(opt.scalars()["skipped"]) == 0, f"{contender.name} skipped steps on {workload.label}"

    opt.state.clear()
    for p in params:  # free the storage now, not when pytest drops the test's frames
        p.grad = None
        p.data = torch.empty(0, device=bench_device, dtype=p.dtype)
    release(bench_device)


def test_device_ops(benchmark, ops_case, bench_device):
    """Device operations of one step (``lrfree.device_ops``), for every contender on every backend at GPT-2's
    tensor layout. A count, not a time: the benchmark runs the counted step once (on a CPU the Triton
    backend runs in its interpreter, which issues the same launches)."""
    workload, contender = ops_case
    contender: Contender
    reason = contender.unavailable()
    if reason:
        pytest.skip(reason)
    data = Materialized(workload, bench_device)
    params = data.fresh_params()
    try:
        opt = contender.make(params)
        for _ in range(2):  # lazy state, then a steady-state step
            contender.step(opt, data.loss)
    except Exception as exc:
        if contender.family == "lrfree" and contender.backend != "cuda":
            raise
        pytest.skip(f"{contender.name} fails on {workload.label}: {type(exc).__name__}: {exc}")
    describe(benchmark, workload, contender.name, contender.method, contender.family, contender.backend,
             contender.state_bytes)
    counted = {}

    def run():
        with count_device_ops() as ops:
            contender.step(opt, data.loss)
            measure.synchronize(bench_device)
        counted["ops"] = ops

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({"kind": "device_ops", "device_ops_per_step": counted["ops"].total,
                                 "device_ops": dict(counted["ops"].by_name)})
    if contender.family == "lrfree":
        assert float(opt.scalars()["skipped"]) == 0, f"{contender.name} skipped steps on {workload.label}"
