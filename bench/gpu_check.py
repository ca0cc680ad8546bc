"""The GPU runbook: on a bare, offline GPU machine, install, check correctness, then measure speed.

    bash bench/gpu_check.sh                  # everything, about 6 minutes on an H100
    bash bench/gpu_check.sh --only bench     # a section group (tests, bench) or test sections (parity, ...)
    bash bench/gpu_check.sh --dry-run        # on any machine: the plan, the checks, the time estimate
    bash bench/gpu_check.sh --fetch-wheels   # on a machine with network: the wheel folder the GPU installs from

GPU machines for this project have torch + CUDA, Triton, nvcc, pybind11, ninja, pytest, pytest-benchmark
and matplotlib, and no network. What they lack comes from ``bench/wheels/`` (git-ignored, ~2 MB; carry it
along): the official reference packages the tests and the benchmark compare against, and setuptools/wheel
for an editable install without build isolation. Nothing here touches the machine's torch or Triton.

Sections, in order (each prints its wall time; the first that fails stops the run and says why):

* ``install`` (always): setuptools/wheel if missing, lrfree ``-e`` without dependencies, the reference wheels.
* ``build`` (always): the CUDA extension for this GPU, started in the background; a test that needs it
  waits for it (torch's extension build lock).
* tests: ``kernels``, ``parity``, ``sync``, ``graphs``, and ``nccl`` when two GPUs are visible. They run
  side by side (``--jobs``), each in its own pytest process: Triton compiles on the CPU, and a GPU machine
  has cores to spare.
* ``bench``: ``bench/run.py --mode check`` (the 738M and GPT-2-small workloads of the speed targets), then
  ``bench/report.py`` (RESULTS.md, charts) and ``AUTO_PREFERS_CUDA`` filled from the run.

Everything a run writes lands in ``bench/results/<device>-check/`` (logs, JUnit XML, ``sections.json``, the
benchmark JSON and charts); copy that folder back and commit it, then ``python bench/report.py`` and
``python bench/report.py --update-auto-prefers-cuda`` reproduce the rest from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WHEELS = os.path.join(HERE, "wheels")
BUDGET_S = 360

# What the GPU image lacks, pinned: the packages the tests and the benchmark compare against (setup.py's
# reference packages and the bench extra's pytorch-optimizer), and what an editable install without build
# isolation needs (pyproject.toml's build requirements).
BUILD_TOOLS = ("setuptools==80.9.0", "wheel==0.45.1")


def reference_packages() -> list[str]:
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"REFERENCE_PACKAGES = \[(.*?)\]", text, re.S).group(1)
    bench = re.search(r'"(pytorch-optimizer==[^"]+)"', text).group(1)
    return re.findall(r'"([^"]+)"', block) + [bench]


def wheel_name(requirement: str) -> str:
    """The file-name prefix of a requirement's wheel: ``dog-optimizer==1.0.3`` -> ``dog_optimizer-1.0.3-``."""
    name, version = requirement.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def wheels_present(folder: str = WHEELS) -> dict[str, str | None]:
    """requirement -> its wheel in ``folder`` (None when missing)."""
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    out = {}
    for req in [*BUILD_TOOLS, *reference_packages()]:
        prefix = wheel_name(req)
        out[req] = next((f for f in files if f.lower().startswith(prefix) and f.endswith(".whl")), None)
    return out


# ------------------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class TestSection:
    name: str
    paths: tuple[str, ...]
    why: str
    select: str = ""          # pytest -k expression
    needs_gpus: int = 1


TEST_SECTIONS = (
    TestSection("kernels", ("tests/test_kernels.py", "tests/test_until_known.py"),
                "the multi-tensor machinery and persistent launches, compiled"),
    TestSection("parity", ("tests/test_backend_parity.py",),
                "every method x backend (triton, cuda) x fp32/bf16/fp64 against the torch backend"),
    TestSection("sync", ("tests/test_no_host_sync.py",),
                "torch.cuda.set_sync_debug_mode('error') around step() for every method"),
    TestSection("graphs", ("tests/test_gpu.py",), "CUDA-graph capture and replay equal to eager; 64-bit offsets"),
    TestSection("nccl", ("tests/test_distributed.py",), "data-parallel steps on NCCL equal one process",
                select="nccl", needs_gpus=2),
)
GROUPS = {"tests": tuple(s.name for s in TEST_SECTIONS), "bench": ("bench",)}


def selected(only: str) -> list[str]:
    """Section names for ``--only`` (groups or section names, comma-separated; empty: all)."""
    names = [n.strip() for n in only.split(",") if n.strip()] or list(GROUPS)
    out: list[str] = []
    for n in names:
        if n in GROUPS:
            out += GROUPS[n]
        elif n in GROUPS["tests"]:
            out.append(n)
        else:
            raise SystemExit(f"gpu_check: --only {n!r}: expected tests, bench or one of {', '.join(GROUPS['tests'])}")
    return list(dict.fromkeys(out))


def pytest_command(section: TestSection, log_dir: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--maxfail=20", *section.paths]
    if section.select:
        cmd += ["-k", section.select]
    if log_dir:
        cmd += [f"--junitxml={os.path.join(log_dir, f'tests-{section.name}.xml')}"]
    return cmd


def bench_command() -> list[str]:
    return [sys.executable, os.path.join(HERE, "run.py"), "--mode", "check"]


# ------------------------------------------------------------------------------------------- the estimate

# An H100's copy bandwidth (what the roofline is measured against), and what a step costs on top.
ESTIMATE_BANDWIDTH = 3.0e12
COMPILE_S = 0.6               # one Triton kernel variant on first use
SETUP_S = 0.4                 # fresh parameters, optimizer state, measuring syncs and peak memory
OFFICIAL_SLOWDOWN = 4.0       # a per-tensor Python loop of torch ops, against one fused pass


def estimate_bench(collected: list[tuple]) -> float:
    """Seconds for the check benchmark: (workload, contender) pairs as bench/conftest.py generates them."""
    import roofline
    from workloads import ROUNDS
    steps = 3 + sum(ROUNDS["check"])  # first step, sync count, peak memory, then warm-up and timed rounds
    total = 0.0
    for workload, contender in collected:
        if contender is None:  # the copy
            total += steps * 8 * workload.numel / ESTIMATE_BANDWIDTH
            continue
        nbytes = roofline.minimal_bytes(contender.method, workload.param_bytes) * workload.numel
        step = nbytes / ESTIMATE_BANDWIDTH
        if contender.family == "official":
            step = step * OFFICIAL_SLOWDOWN + len(workload.shapes) * 20 * 8e-6
        elif contender.backend == "foreach":
            step *= 1.5
        clone = 4 * workload.param_bytes * workload.numel / ESTIMATE_BANDWIDTH
        compile_s = 3 * COMPILE_S if contender.family == "lrfree" else 0.0
        total += steps * step + clone + SETUP_S + compile_s
    return total


# Measured on CPU-only machines, scaled: collection counts give the tests' share (a GPU test is mostly
# Triton compiles, ~COMPILE_S each, and runs side by side).
ESTIMATES_S = {"install": 20, "build": 90, "report": 15}
TEST_ITEM_S = 0.35


def estimate_tests(counts: dict[str, int], jobs: int) -> float:
    """Side by side in ``jobs`` processes: roughly the longest share."""
    per = sorted((n * TEST_ITEM_S for n in counts.values()), reverse=True)
    lanes = [0.0] * max(1, jobs)
    for t in per:
        lanes[lanes.index(min(lanes))] += t
    return max(lanes, default=0.0)


# ------------------------------------------------------------------------------------------- running

@dataclass
class Log:
    folder: str | None
    sections: list[dict] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.folder:
            with open(os.path.join(self.folder, "gpu_check.log"), "a", encoding="utf-8") as f:
                f.write(text + "\n")

    def record(self, name: str, status: str, seconds: float, detail: str = "") -> None:
        self.sections.append({"section": name, "status": status, "seconds": round(seconds, 1), "detail": detail})
        self.say(f"[{name}] {status} in {seconds:.1f} s{': ' + detail if detail else ''}")
        if self.folder:
            with open(os.path.join(self.folder, "sections.json"), "w", encoding="utf-8") as f:
                json.dump(self.sections, f, indent=1)


def run_logged(cmd: list[str], log_path: str, env: dict | None = None) -> int:
    with open(log_path, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def tail(path: str, lines: int = 40) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().splitlines()
    failed = [ln for ln in text if ln.startswith(("FAILED", "ERROR"))]
    return "\n".join((failed[:20] + ["..."] if failed else []) + text[-lines:])


def install(log: Log) -> bool:
    """Offline: nothing comes from an index; torch and Triton stay the machine's."""
    start = time.time()
    have = wheels_present()
    out = os.path.join(log.folder, "install.log")
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", WHEELS]
    for tool in BUILD_TOOLS:
        module = tool.split("==")[0]
        if importlib.util.find_spec(module) is None:
            if have[tool] is None:
                log.record("install", "failed", time.time() - start,
                           f"{module} is not installed and bench/wheels has no {tool}: run "
                           "`bash bench/gpu_check.sh --fetch-wheels` where there is network and carry bench/wheels")
                return False
            if run_logged(pip + [tool], out + f".{module}") != 0:
                log.record("install", "failed", time.time() - start, tail(out + f".{module}"))
                return False
    if run_logged(pip + ["--no-build-isolation", "-e", ROOT], out) != 0:
        log.record("install", "failed", time.time() - start, tail(out))
        return False
    missing = [req for req in reference_packages() if have[req] is None]
    present = [req for req in reference_packages() if have[req] is not None]
    if present and run_logged(pip + present, out + ".references") != 0:
        log.record("install", "failed", time.time() - start, tail(out + ".references"))
        return False
    detail = f"lrfree + {len(present)} reference packages"
    if missing:  # the tests need them (oracles): say so now, not as 40 import errors later
        log.record("install", "failed", time.time() - start,
                   f"{detail}; missing wheels: {', '.join(missing)} (run --fetch-wheels and carry bench/wheels)")
        return False
    log.record("install", "ok", time.time() - start, detail)
    return True


def start_build(log: Log) -> subprocess.Popen:
    """The extension for this GPU, in the background (tests that need it wait on torch's build lock)."""
    code = "from lrfree.backends import cuda_ext; cuda_ext.extension('cuda'); print('built', cuda_ext._source_hash('cuda'))"
    f = open(os.path.join(log.folder, "build.log"), "w", encoding="utf-8")
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)


def run_tests(log: Log, names: list[str], jobs: int, gpus: int) -> bool:
    sections = [s for s in TEST_SECTIONS if s.name in names]
    for s in sections:
        if s.needs_gpus > gpus:
            log.record(s.name, "skipped", 0.0, f"needs {s.needs_gpus} GPUs, {gpus} visible")
    sections = [s for s in sections if s.needs_gpus <= gpus]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    done: dict[str, tuple[int, float]] = {}
    queue = list(sections)
    while queue or running:
        while queue and len(running) < max(1, jobs):
            s = queue.pop(0)
            f = open(os.path.join(log.folder, f"tests-{s.name}.log"), "w", encoding="utf-8")
            running[s.name] = (subprocess.Popen(pytest_command(s, log.folder), cwd=ROOT, stdout=f,
                                                stderr=subprocess.STDOUT), time.time())
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                done[name] = (proc.returncode, time.time() - t0)
                del running[name]
                if proc.returncode not in (0, 5) and jobs == 1:
                    queue.clear()  # one at a time: stop at the first failure
        time.sleep(0.5)
    ok = True
    for s in sections:  # in order: the first failure is the one reported
        if s.name not in done:
            continue
        code, seconds = done[s.name]
        logfile = os.path.join(log.folder, f"tests-{s.name}.log")
        summary = tail(logfile, 1).splitlines()[-1] if os.path.getsize(logfile) else ""
        if code in (0, 5):
            log.record(s.name, "ok", seconds, summary)
        elif ok:
            log.record(s.name, "failed", seconds, f"{s.why}\n{tail(logfile)}")
            ok = False
        else:
            log.record(s.name, "failed", seconds, summary)
    return ok


def wait_build(log: Log, proc: subprocess.Popen, started: float) -> bool:
    code = proc.wait()
    detail = tail(os.path.join(log.folder, "build.log"), 20)
    log.record("build", "ok" if code == 0 else "failed", time.time() - started,
               detail.splitlines()[-1] if code == 0 else detail)
    return code == 0


def run_bench(log: Log) -> bool:
    start = time.time()
    code = run_logged(bench_command(), os.path.join(log.folder, "bench.log"))
    if code != 0:
        log.record("bench", "failed", time.time() - start, tail(os.path.join(log.folder, "bench.log")))
        return False
    log.record("bench", "ok", time.time() - start, tail(os.path.join(log.folder, "bench.log"), 1))
    start = time.time()
    code = run_logged([sys.executable, os.path.join(HERE, "report.py"), "--update-auto-prefers-cuda"],
                      os.path.join(log.folder, "report.log"))
    log.record("report", "ok" if code == 0 else "failed", time.time() - start,
               tail(os.path.join(log.folder, "report.log"), 3))
    return code == 0


def results_folder() -> str:
    import torch
    sys.path.insert(0, HERE)
    import environment  # torch only: lrfree is not installed yet
    return environment.results_dir(torch.device("cuda"), "check")


def run(args) -> int:
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible; `--dry-run` walks the plan on this machine", file=sys.stderr)
        return 2
    names = selected(args.only)
    folder = results_folder()
    os.makedirs(folder, exist_ok=True)
    log = Log(folder)
    if os.path.exists(os.path.join(folder, "gpu_check.log")):
        os.remove(os.path.join(folder, "gpu_check.log"))
    begin = time.time()
    gpus = torch.cuda.device_count()
    log.say(f"gpu_check: {torch.cuda.get_device_name(0)} x {gpus}, torch {torch.__version__}, sections "
            f"{', '.join(names)}; results in {os.path.relpath(folder, ROOT)}")
    try:
        subprocess.run(["nvidia-smi"], stdout=open(os.path.join(folder, "nvidia-smi.txt"), "w"),
                       stderr=subprocess.STDOUT, check=False)
    except OSError:
        pass
    if not install(log):
        return 1
    build_start = time.time()
    build = start_build(log)
    tests = [n for n in names if n in GROUPS["tests"]]
    ok = run_tests(log, tests, args.jobs, gpus) if tests else True
    ok = wait_build(log, build, build_start) and ok
    if ok and "bench" in names:
        ok = run_bench(log)
    elif "bench" in names:
        log.say("gpu_check: bench not run (a section above failed)")
    log.say(f"gpu_check: {'all sections passed' if ok else 'FAILED'} in {time.time() - begin:.0f} s "
            f"(budget {BUDGET_S} s); sections.json and logs in {os.path.relpath(folder, ROOT)}")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------- dry run

def collect(cmd: list[str]) -> tuple[int, str]:
    """pytest --collect-only: the number of items it would run."""
    proc = subprocess.run(cmd + ["--collect-only"], cwd=ROOT, capture_output=True, text=True)
    n = sum(1 for ln in proc.stdout.splitlines() if "::" in ln)
    return n, proc.stdout + proc.stderr if proc.returncode not in (0, 5) else ""


def dry_run(args) -> int:
    names = selected(args.only)
    print(f"gpu_check --dry-run: sections {', '.join(names)} (no CUDA needed; nothing is installed or written)")
    # wheel folder
    have = wheels_present()
    print(f"\n[wheels] {os.path.relpath(WHEELS, ROOT)}:")
    for req, found in have.items():
        print(f"  {req:28s} {found or 'MISSING (run --fetch-wheels where there is network)'}")
    # install plan
    pip = "python -m pip install -q --no-index --no-deps --find-links bench/wheels"
    print("\n[install]")
    for tool in BUILD_TOOLS:
        print(f"  {pip} {tool}    # only if `import {tool.split('==')[0]}` fails")
    print(f"  {pip} --no-build-isolation -e .")
    print(f"  {pip} {' '.join(reference_packages())}")
    print("\n[build] the CUDA extension (csrc/bindings.cpp, csrc/cuda_launch.cu) for the visible GPU's arch, in the "
          "background; tests that need it wait for it")
    # tests
    counts = {}
    for s in TEST_SECTIONS:
        if s.name not in names:
            continue
        n, error = collect(pytest_command(s, None))
        counts[s.name] = n
        gate = f", only with >= {s.needs_gpus} GPUs" if s.needs_gpus > 1 else ""
        print(f"\n[{s.name}] {n} tests{gate}: {s.why}\n  {' '.join(pytest_command(s, None)[1:])}")
        if error:
            print(error[-3000:])
            return 1
    # bench
    bench_s = 0.0
    if "bench" in names:
        sys.path.insert(0, HERE)
        import torch
        import contenders as C
        import workloads as W
        cases = []
        for w in W.workloads("check"):
            cases.append((w, None))
            cases += [(w, c) for c in C.contenders(C.backends_for(torch.device("cuda"), "check"), compact=True)]
        bench_s = estimate_bench(cases)
        print(f"\n[bench] {len(cases)} benchmarks ({', '.join(w.label for w in W.workloads('check'))}):")
        for w in W.workloads("check"):
            names_ = [c.name for wl, c in cases if wl == w and c is not None]
            print(f"  {w.label} ({w.numel / 1e6:.0f}M elements, {len(w.shapes)} tensors): {len(names_)} contenders")
        print(f"  {' '.join(bench_command()[1:])}; then bench/report.py --update-auto-prefers-cuda")
    tests_s = estimate_tests(counts, args.jobs)
    estimate = ESTIMATES_S["install"] + max(tests_s, ESTIMATES_S["build"] if counts else 0) + bench_s + \
        (ESTIMATES_S["report"] if "bench" in names else 0)
    print(f"\n[estimate] install {ESTIMATES_S['install']} s, tests {tests_s:.0f} s side by side with the build "
          f"({ESTIMATES_S['build']} s), bench {bench_s:.0f} s, report {ESTIMATES_S['report']} s: about "
          f"{estimate / 60:.1f} min on an H100 (budget {BUDGET_S / 60:.0f} min)")
    missing = [r for r, f in have.items() if f is None]
    if missing:
        print(f"\nnote: {len(missing)} wheel(s) missing; a GPU run would stop at install")
    return 0


def fetch_wheels(args) -> int:
    reqs = [*BUILD_TOOLS, *reference_packages()]
    os.makedirs(WHEELS, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", WHEELS, *reqs]
    print("$ " + " ".join(cmd))
    code = subprocess.run(cmd).returncode
    if code != 0:
        return code
    have = wheels_present()
    missing = [r for r, f in have.items() if f is None]
    size = sum(os.path.getsize(os.path.join(WHEELS, f)) for f in have.values() if f)
    print(f"{len(have) - len(missing)} wheels in {os.path.relpath(WHEELS, ROOT)} ({size / 2**20:.1f} MiB)"
          + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="walk the plan without CUDA; write nothing")
    mode.add_argument("--fetch-wheels", action="store_true", help="fill bench/wheels (needs network)")
    parser.add_argument("--only", default="", help="comma-separated: tests, bench, or test sections "
                        f"({', '.join(GROUPS['tests'])}); default: all")
    parser.add_argument("--jobs", type=int, default=4, help="test sections side by side (1: stop at the first "
                        "failure at once)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.fetch_wheels:
        return fetch_wheels(args)
    if args.dry_run:
        return dry_run(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
