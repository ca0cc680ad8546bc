"""The benchmark suite cannot rot: it runs end to end at a tiny size, and its report arithmetic is checked.

The smoke run times every contender once or twice on a 4K-element GPT-2-shaped model (the Triton backend
in the interpreter), writes pytest-benchmark JSON, and the report turns it into RESULTS.md and charts.
The arithmetic of the report (% of roofline, ratios, targets) is checked on a synthetic run whose answers
are known in closed form.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import contenders  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
import roofline  # noqa: E402
import workloads  # noqa: E402

import lrfree  # noqa: E402


def test_smoke_run_and_report(tmp_path):
    pytest.importorskip("matplotlib")
    json_path = tmp_path / "results.json"
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.update(TRITON_INTERPRET="1", LRFREE_CUDA_HOST="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", BENCH, "-q", "-p", "no:cacheprovider", "--bench-mode=smoke",
                           "--bench-device=cpu", f"--benchmark-json={json_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    out = tmp_path / "RESULTS.md"
    assert report.main([str(json_path), "--out", str(out)]) == 0
    text = out.read_text()
    expected = [c for c in contenders.contenders(("torch", "triton", "cuda")) if c.unavailable() is None]
    for workload in workloads.workloads("smoke"):
        assert f"**{workload.label}**" in text
        section = text.split(f"**{workload.label}**", 1)[1].split("\n\n", 2)[1]
        for c in expected:
            assert f"| {c.name} |" in section, (workload.label, c.name)
    for chart in ("step_time.png", "roofline.png"):
        assert (tmp_path / chart).stat().st_size > 1000
    assert "not yet measured" in text  # a CPU run fills no GPU target

    data = json.loads(json_path.read_text())
    counted = {b["extra_info"]["contender"]: b["extra_info"] for b in data["benchmarks"]
               if b["extra_info"].get("kind") == "device_ops"}
    assert "**Device operations per step**" in text
    for c in expected:  # every contender's step counted once, and reported
        assert counted[c.name]["device_ops_per_step"] > 0, c.name
    assert counted["torch.optim.AdamW(fused=True)"]["device_ops_per_step"] <= 3  # the fused baseline: one kernel
    rows = {(b["extra_info"]["workload"], b["extra_info"]["contender"]): b["extra_info"] for b in data["benchmarks"]
            if b["extra_info"].get("kind", "step") == "step"}
    for (workload, name), info in rows.items():
        if name.startswith("lrfree."):
            assert info["host_syncs_per_step"] == 0, name
            assert info["finite"]
    # an official package that reads its scalars back is seen doing it
    assert rows[("gpt2-tiny-float32", "dadaptation.DAdaptAdam")]["host_syncs_per_step"] > 0


def test_run_sets_the_interpreter_before_triton_is_imported():
    """``bench/run.py`` imports lrfree, and with it Triton, before pytest loads the suite's conftest. On a
    CPU, TRITON_INTERPRET must already be set then: Triton's own @jit helpers are interpreted only if it
    was set when Triton was imported, and without them every interpreted kernel of the run failed."""
    if torch.cuda.is_available():
        pytest.skip("the CPU run's interpreter")
    code = ("import sys, pytest; sys.path.insert(0, 'bench'); import run; sys.exit(pytest.main(['bench', '-q', "
            "'-p', 'no:cacheprovider', '--bench-mode=smoke', '--benchmark-disable', '-k', "
            "'test_device_ops and lrfree.SPS and triton']))")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LRFREE_CUDA_HOST")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def _bench(workload, contender, median, numel=10**6, method=None, family="lrfree", backend="triton", peak=0.0):
    method = method or contender.split(".")[-1].split("[")[0].split("(")[0]
    return {"stats": {"median": median}, "extra_info": {
        "workload": workload, "contender": contender, "method": method, "family": family, "backend": backend,
        "numel": numel, "n_tensors": 111, "dtype": "float32", "sweep": False,
        "bytes_per_element": roofline.minimal_bytes(method, 4), "implemented_bytes_per_element": None,
        "host_syncs_per_step": 0, "state_bytes_per_param": 8.0, "peak_extra_bytes_per_param": peak}}


def test_report_arithmetic(tmp_path):
    """1e6 elements, copy 1 ms → 8 GB/s; every figure below follows from that by hand."""
    w = report.BIG
    benches = [
        _bench(w, "copy", 1e-3, method="copy", family="copy", backend=""),
        _bench(w, report.BASELINE, 4e-3, method="AdamW", family="torch", backend="fused"),   # 28 B: 87.5%
        _bench(w, "lrfree.AdamW[triton]", 3.5e-3),                                           # 100%, 0.875×
        _bench(w, "lrfree.PSDASGD[triton]", 5e-3),                                           # 36 B: 90%, 1.25×
        _bench(w, "lrfree.DAdaptAdam[triton]", 4.5e-3),                                      # 36 B: 100%
        _bench(w, "dadaptation.DAdaptAdam", 22.5e-3, family="official", backend=""),        # 5× slower
        _bench(w, "lrfree.InexactPolyak[triton]", 2.5e-3, peak=0.5),                         # 16 B: 80%
        _bench(w, "lrfree.PSDASGD[cuda]", 4e-3, backend="cuda"),                              # faster than triton
        _bench(w, "lrfree.AdamW[cuda]", 4e-3, backend="cuda"),                                # slower than triton
    ]
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"datetime": "now", "benchmarks": benches, "machine_info": {"lrfree": {
        "device": "Test GPU", "device_type": "cuda", "mode": "full", "versions": {}}}}))
    run = report.load(str(path))
    row = {r.contender: r for r in run.rows}
    assert math.isclose(run.copy_bandwidth(w), 8e9)
    assert math.isclose(run.percent_of_roofline(row[report.BASELINE]), 87.5)
    assert math.isclose(run.percent_of_roofline(row["lrfree.PSDASGD[triton]"]), 90.0)
    assert math.isclose(run.vs_baseline(row["lrfree.PSDASGD[triton]"]), 1.25)
    assert math.isclose(run.speedup_vs_official(row["lrfree.DAdaptAdam[triton]"]), 5.0)
    assert run.speedup_vs_official(row["lrfree.AdamW[triton]"]) is None  # no official AdamW package

    checks = {t.text: t.check(run) for t in report.TARGETS}
    roofline_target = "every lrfree method (triton) ≥ 95% of its roofline (minimal bytes, + the guard pass's)"
    assert checks[roofline_target] == ("lowest 80.0% (InexactPolyak)", False)
    assert checks["lrfree AdamW (triton) faster than torch fused AdamW"] == ("0.88", True)
    assert checks["PSDASGD (triton) ≤ 1.15× fused AdamW"] == ("1.25", False)
    assert checks["DAdaptAdam, Prodigy (triton) ≥ 4× faster than dadaptation / prodigyopt"] == ("5.0×", True)
    assert checks["GPT-2 small: whole step ≤ 1.3× fused AdamW (every lrfree method, triton)"] is None
    assert checks["no per-step allocation that grows with the parameter count (peak extra < 0.01 B/param)"][1] is False

    # the target counts the bytes the step is built to move: a guard pass's 4 B are the method's own
    target = next(t for t in report.TARGETS if t.text == roofline_target)
    others = report.Run(run.path, run.device, run.device_type, run.mode, run.datetime, run.versions,
                        [r for r in run.rows if r.method != "InexactPolyak"])
    assert target.check(others) == ("lowest 90.0% (PSDASGD)", False)
    next(r for r in others.rows if r.contender == "lrfree.PSDASGD[triton]").implemented_bytes = 38
    assert target.check(others) == ("lowest 95.0% (PSDASGD)", True)

    out = tmp_path / "RESULTS.md"
    report.main([str(path), "--out", str(out), "--no-charts"])
    text = out.read_text()
    assert "| lrfree.PSDASGD[triton] | 5 ms | 36 | 7.2 | 90.0 | 1.25 |" in text
    assert "| PSDASGD (triton) ≤ 1.15× fused AdamW | 1.25 | **no** |" in text
    assert "| PSDASGD | 5 ms | 4 ms | 1.25 | cuda |" in text
    assert "| AdamW | 3.5 ms | 4 ms | 0.88 | triton |" in text


def test_report_cpu_targets(tmp_path):
    """The torch backend's CPU targets, against foreach AdamW and the official packages, by hand."""
    w = report.CPU_WORKLOAD
    benches = [
        _bench(w, report.FOREACH, 1e-3, method="AdamW", family="torch", backend="foreach"),
        _bench(w, "lrfree.AdamW[torch]", 1.4e-3, backend="torch"),                       # 1.4×: met
        _bench(w, "lrfree.Prodigy[torch]", 2.5e-3, backend="torch"),                     # 2.5×: not met
        _bench(w, "prodigyopt.Prodigy", 2e-3, method="Prodigy", family="official", backend=""),  # 0.8×
        _bench(w, "lrfree.DoG[torch]", 1e-3, backend="torch"),
        _bench(w, "dog.DoG", 3e-3, method="DoG", family="official", backend=""),          # 3×
    ]
    benches.append({"stats": {"median": 0.1}, "extra_info": {  # a device-ops count: in its own table only
        **benches[1]["extra_info"], "workload": "gpt2-layout-float32", "kind": "device_ops",
        "device_ops_per_step": 7}})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"datetime": "now", "benchmarks": benches, "machine_info": {"lrfree": {
        "device": "Test CPU", "device_type": "cpu", "mode": "quick", "versions": {}}}}))
    run = report.load(str(path))
    assert run.workloads() == [w]
    every, adamw, official = (t.check(run) for t in report.CPU_TARGETS)
    assert every is None  # not every method was timed
    assert adamw == ("highest 1.40× (AdamW)", True)
    assert official == ("Prodigy 0.80×, DoG 3.00×", False)
    out = tmp_path / "RESULTS.md"
    report.main([str(path), "--out", str(out), "--no-charts"])
    text = out.read_text()
    assert "| lrfree AdamW (torch backend) ≤ 1.5× torch.optim.AdamW(foreach=True) | highest 1.40× (AdamW) | yes |" in text
    assert "| AdamW | 7 | — |" in text  # the device-ops table


def test_bytes_model():
    assert roofline.minimal_bytes("AdamW", 4) == 28
    assert roofline.minimal_bytes("AdamW", 2) == 22            # params and grads halve, m and v stay fp32
    assert roofline.minimal_bytes("InexactPolyak", 2) == 8
    for method in contenders.LRFREE_METHODS:
        assert method in lrfree.__all__
        assert roofline.FUSED[method].fp32_bytes >= roofline.MINIMAL[method].fp32_bytes, method
    wrappers = {"GLyDER"}  # timed around a base optimizer (contenders._glyder)
    assert set(contenders.LRFREE_METHODS) | wrappers == {n for n in lrfree.__all__
                                                         if n not in ("__version__", "FusedOptimizer")}
    for method in wrappers:
        assert roofline.FUSED[method].fp32_bytes >= roofline.MINIMAL[method].fp32_bytes, method
        assert any(c.method == method for c in contenders.contenders(("torch", "triton")))


def test_workload_shapes():
    """The named workloads are the models they claim to be."""
    named = {w.name: w for w in workloads.workloads("full", max_numel=2**26)}
    gpt2, llama = named["gpt2-124M"], named["llama-738M"]
    assert len(gpt2.shapes) == 148 and abs(gpt2.numel - 124.4e6) < 0.1e6
    assert len(llama.shapes) == 111 and abs(llama.numel - 738e6) < 1e6
    sweep = [w for w in workloads.workloads("full", max_numel=2**26) if w.sweep]
    assert [len(w.shapes) for w in sweep] == [111] * len(sweep)
    for w, target in zip(sweep, (2**20, 2**22, 2**24, 2**26)):
        assert abs(w.numel / target - 1) < 0.15, (w.name, w.numel, target)
    assert max(w.numel for w in sweep) <= 2**26 * 1.15


def test_host_read_counter():
    x = torch.ones(3)
    item = torch.Tensor.item
    with measure.count_host_reads(torch.device("cpu")) as counts:
        x.sum().item()
        bool(x.max() > 0)
        float(x[0])
    assert measure.host_syncs(counts) == 3
    with measure.count_host_reads(torch.device("cpu")) as counts:
        x.add_(1)
    assert measure.host_syncs(counts) == 0
    assert torch.Tensor.item is item  # the counter leaves torch as it found it


def test_state_bytes_counts_each_storage_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(10)
    opt.step()
    assert measure.state_bytes(opt) == 2 * 40 + 4  # exp_avg, exp_avg_sq, and the step counter
