"""bench/gpu_check.sh, the GPU runbook, on a machine without a GPU: the dry run walks the whole plan, and the
pieces that decide what a GPU run does (wheel lookup, section selection, the estimate, the benchmark set,
AUTO_PREFERS_CUDA from a run) are pinned on made-up inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_check  # noqa: E402


def test_dry_run_walks_every_section_and_exits_0():
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for section in ("[wheels]", "[install]", "[build]", "[kernels]", "[parity]", "[sync]", "[graphs]", "[nccl]",
                    "[bench]", "[estimate]"):
        assert section in out, section
    for req in gpu_check.reference_packages():
        assert req in out
    assert "--no-build-isolation -e ." in out and "--no-index" in out
    # every test section collects tests (a renamed file would show up as 0 here)
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\[(\w+)\] (\d+) tests", out, re.M)}
    assert set(counts) == {s.name for s in gpu_check.TEST_SECTIONS} and all(counts.values()), counts
    assert "llama-738M-float32" in out and "gpt2-124M-bfloat16" in out
    minutes = float(out.split("about ")[1].split(" min")[0])
    assert 0 < minutes <= gpu_check.BUDGET_S / 60, out.splitlines()[-3:]


def test_dry_run_of_one_group():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run", "--only",
                           "bench"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[bench]" in proc.stdout and "[parity]" not in proc.stdout


def test_without_a_gpu_the_real_run_refuses_and_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_wheel_lookup_normalizes_names(tmp_path):
    for name in ("dog_optimizer-1.0.3-py3-none-any.whl", "pytorch_optimizer-4.1.0-py3-none-any.whl",
                 "dadaptation-3.1-py3-none-any.whl"):  # a different version does not count
        (tmp_path / name).write_bytes(b"")
    have = gpu_check.wheels_present(str(tmp_path))
    assert have["dog-optimizer==1.0.3"] == "dog_optimizer-1.0.3-py3-none-any.whl"
    assert have["pytorch-optimizer==4.1.0"] == "pytorch_optimizer-4.1.0-py3-none-any.whl"
    assert have["dadaptation==3.2"] is None
    assert set(have) == {*gpu_check.BUILD_TOOLS, *gpu_check.reference_packages()}


def test_reference_packages_are_setups():
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup = f.read()
    refs = gpu_check.reference_packages()
    assert all(f'"{r}"' in setup for r in refs) and any(r.startswith("pytorch-optimizer==") for r in refs)
    assert len(refs) == 5


@pytest.mark.parametrize("only, expected", [
    ("", ["kernels", "parity", "sync", "graphs", "nccl", "bench"]),
    ("tests", ["kernels", "parity", "sync", "graphs", "nccl"]),
    ("bench", ["bench"]),
    ("parity,bench", ["parity", "bench"]),
])
def test_only_selects_sections(only, expected):
    assert gpu_check.selected(only) == expected


def test_only_rejects_an_unknown_section():
    with pytest.raises(SystemExit, match="--only 'benchmarks'"):
        gpu_check.selected("benchmarks")


def test_tests_estimate_is_the_longest_lane():
    assert gpu_check.estimate_tests({"a": 100, "b": 10, "c": 10}, jobs=4) == pytest.approx(100 * gpu_check.TEST_ITEM_S)
    assert gpu_check.estimate_tests({"a": 100, "b": 10, "c": 10}, jobs=1) == pytest.approx(120 * gpu_check.TEST_ITEM_S)


def test_check_benchmark_is_the_targets_workloads_and_contenders():
    import contenders as C
    import workloads as W
    assert [w.label for w in W.workloads("check")] == ["llama-738M-float32", "gpt2-124M-float32",
                                                       "gpt2-124M-bfloat16"]
    assert not W.has_sweep("check")
    names = [c.name for c in C.contenders(("torch", "triton", "cuda"), compact=True)]
    assert "torch.optim.AdamW(fused=True)" in names and "torch.optim.AdamW(foreach=True)" in names
    assert {n for n in names if not n.startswith(("lrfree.", "torch."))} == set(C.CHECK_OFFICIAL)
    assert not any(n.endswith("[torch]") for n in names)
    assert {f"lrfree.{m}[triton]" for m in C.LRFREE_METHODS} <= set(names)
    assert "lrfree.PSDASGD[cuda]" in names and "lrfree.DoG[cuda]" not in names  # the extension's coverage


def _run_json(path, rows):
    benches = [{"stats": {"median": t}, "extra_info": {
        "workload": w, "contender": c, "method": c.split(".")[1].split("[")[0], "family": "lrfree",
        "backend": c.split("[")[1][:-1], "numel": 10**6, "n_tensors": 111, "dtype": "float32", "sweep": False,
        "bytes_per_element": 16}} for w, c, t in rows]
    path.write_text(json.dumps({"datetime": "now", "benchmarks": benches, "machine_info": {"lrfree": {
        "device": "Test GPU", "device_type": "cuda", "mode": "check", "versions": {}}}}))
    return str(path)


def test_auto_prefers_cuda_needs_every_method_of_a_module_to_win_everywhere(tmp_path):
    import report
    w1, w2 = "llama-738M-float32", "gpt2-124M-float32"
    rows = [
        # adam: both methods faster on cuda on both workloads -> preferred
        (w1, "lrfree.Adam[triton]", 1.0), (w1, "lrfree.Adam[cuda]", 0.9),
        (w1, "lrfree.AdamW[triton]", 1.0), (w1, "lrfree.AdamW[cuda]", 0.95),
        (w2, "lrfree.Adam[triton]", 1.0), (w2, "lrfree.Adam[cuda]", 0.9),
        # prodigy: within the noise margin -> not preferred
        (w1, "lrfree.Prodigy[triton]", 1.0), (w1, "lrfree.Prodigy[cuda]", 0.99),
        # sgd: one method of the module loses on one workload -> not preferred
        (w1, "lrfree.SPS[triton]", 1.0), (w1, "lrfree.SPS[cuda]", 0.5),
        (w2, "lrfree.InexactPolyak[triton]", 1.0), (w2, "lrfree.InexactPolyak[cuda]", 1.2),
    ]
    run = report.load(_run_json(tmp_path / "run.json", rows))
    assert report.auto_prefers_cuda(run) == frozenset({"adam"})

    source = tmp_path / "backends.py"
    with open(report.BACKENDS_SOURCE) as f:
        source.write_text(f.read())
    line = report.update_auto_prefers_cuda(frozenset({"adam", "ps_sps"}), str(source))
    assert line == 'AUTO_PREFERS_CUDA: frozenset[str] = frozenset({"adam", "ps_sps"})'
    assert line in source.read_text().splitlines()
    report.update_auto_prefers_cuda(frozenset(), str(source))
    assert "AUTO_PREFERS_CUDA: frozenset[str] = frozenset()" in source.read_text().splitlines()
    compile(source.read_text(), str(source), "exec")
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="expected one AUTO_PREFERS_CUDA line"):
        report.update_auto_prefers_cuda(frozenset(), str(tmp_path / "other.py"))


def test_update_without_a_gpu_run_changes_nothing(tmp_path, capsys):
    import report
    with open(report.BACKENDS_SOURCE) as f:
        before = f.read()
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"datetime": "now", "benchmarks": [], "machine_info": {"lrfree": {
        "device": "CPU", "device_type": "cpu", "mode": "quick", "versions": {}}}}))
    assert report.main([str(cpu), "--update-auto-prefers-cuda"]) == 0
    assert "no GPU run recorded" in capsys.readouterr().out
    with open(report.BACKENDS_SOURCE) as f:
        assert f.read() == before
