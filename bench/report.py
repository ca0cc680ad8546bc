"""Turn pytest-benchmark JSON files into ``bench/RESULTS.md`` and PNG charts.

    python bench/report.py                      # every bench/results/*/results.json → bench/RESULTS.md
    python bench/report.py RUN.json ... --out FILE.md

Every number in the output comes from a JSON file of a run; what no run measured is written as
"not yet measured". Charts go next to each run's JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import roofline  # noqa: E402
from contenders import BASELINE, CANONICAL_OFFICIAL  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_MEASURED = "not yet measured"


@dataclass
class Row:
    workload: str
    contender: str
    method: str
    family: str
    backend: str
    numel: int
    n_tensors: int
    dtype: str
    sweep: bool
    median: float                        # seconds per step
    bytes_per_element: int
    implemented_bytes: int | None = None
    host_syncs: int | None = None
    device_ops: int | None = None
    kind: str = "step"                   # "step": a timed step; "device_ops": a counted one (test_device_ops)
    state_bytes: float | None = None
    peak_extra_bytes: float | None = None
    statistic_bytes: int = 4             # bytes per stored statistic element (2: bf16 state)


@dataclass
class Run:
    path: str
    device: str
    device_type: str
    mode: str
    datetime: str
    versions: dict
    rows: list[Row] = field(default_factory=list)

    def workloads(self, sweep: bool = False) -> list[str]:
        return list(dict.fromkeys(r.workload for r in self.rows
                                  if r.sweep == sweep and r.contender != "copy" and r.kind == "step"))

    def rows_of(self, workload: str) -> list[Row]:
        return [r for r in self.rows if r.workload == workload and r.kind == "step"]

    def counted(self) -> list[Row]:
        """The device-operation counts (test_device_ops)."""
        return [r for r in self.rows if r.kind == "device_ops"]

    def find(self, workload: str, contender: str) -> Row | None:
        return next((r for r in self.rows_of(workload) if r.contender == contender), None)

    def copy_bandwidth(self, workload: str) -> float | None:
        copy = self.find(workload, "copy")
        return None if copy is None else roofline.achieved_bandwidth(8, copy.numel, copy.median)

    def percent_of_roofline(self, row: Row, bytes_per_element: int | None = None) -> float | None:
        """Against the method's minimal bytes, or ``bytes_per_element`` when given."""
        bandwidth = self.copy_bandwidth(row.workload)
        if bandwidth is None:
            return None
        return roofline.percent_of_roofline(bytes_per_element or row.bytes_per_element, row.numel, row.median,
                                            bandwidth)

    def vs_baseline(self, row: Row) -> float | None:
        base = self.find(row.workload, BASELINE)
        return None if base is None else row.median / base.median

    def speedup_vs_official(self, row: Row) -> float | None:
        if row.family != "lrfree" or row.method not in CANONICAL_OFFICIAL:
            return None
        official = self.find(row.workload, CANONICAL_OFFICIAL[row.method])
        return None if official is None else official.median / row.median


def load(path: str) -> Run:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    info = data.get("machine_info", {}).get("lrfree")
    if info is None:
        raise ValueError(f"{path}: not a run of the lrfree benchmark suite (machine_info.lrfree is missing)")
    run = Run(path, info["device"], info["device_type"], info["mode"], data.get("datetime", "?"), info["versions"])
    for bench in data["benchmarks"]:
        e = bench["extra_info"]
        run.rows.append(Row(
            workload=e["workload"], contender=e["contender"], method=e["method"], family=e["family"],
            backend=e["backend"], numel=e["numel"], n_tensors=e["n_tensors"], dtype=e["dtype"], sweep=e["sweep"],
            median=bench["stats"]["median"], bytes_per_element=e["bytes_per_element"],
            implemented_bytes=e.get("implemented_bytes_per_element"), host_syncs=e.get("host_syncs_per_step"),
            device_ops=e.get("device_ops_per_step"), kind=e.get("kind", "step"),
            state_bytes=e.get("state_bytes_per_param"), peak_extra_bytes=e.get("peak_extra_bytes_per_param"),
            statistic_bytes=e.get("state_bytes_per_statistic", 4)))
    return run


# ----------------------------------------------------------------------------------------------- text

def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def _time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def bytes_table() -> list[str]:
    lines = ["| method | minimal B/elem fp32 | minimal B/elem bf16 | minimal B/elem fp32, bf16 state | "
             "fused (triton) B/elem fp32 | fused passes | where the fused excess comes from |",
             "|---|---|---|---|---|---|---|"]
    for method, minimal in roofline.MINIMAL.items():
        if method == "copy":
            continue
        fused = roofline.FUSED.get(method)
        lines.append(f"| {method} | {minimal.fp32_bytes} | {minimal.bytes_per_element(2)} | "
                     f"{minimal.bytes_per_element(4, 2)} | "
                     f"{_fmt(fused and fused.fp32_bytes, 'd')} | {_fmt(fused and fused.passes, 'd')} | "
                     f"{(fused.note if fused and fused.fp32_bytes > minimal.fp32_bytes else '') or '—'} |")
    return lines


def workload_table(run: Run, workload: str) -> list[str]:
    rows = sorted((r for r in run.rows_of(workload) if r.contender != "copy"), key=lambda r: r.median)
    first = rows[0]
    bandwidth = run.copy_bandwidth(workload)
    lines = [f"**{workload}** — {_count(first.numel)} elements in {first.n_tensors} tensors; copy bandwidth "
             f"{_fmt(bandwidth and bandwidth / 1e9, '.1f', NOT_MEASURED)} GB/s", "",
             "| contender | median step | B/elem (minimal) | achieved GB/s | % of roofline | × AdamW(fused) | "
             "speed-up vs official | state B/param | peak extra B/param | host syncs/step | device ops/step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        achieved = roofline.achieved_bandwidth(r.bytes_per_element, r.numel, r.median) / 1e9
        speedup = run.speedup_vs_official(r)
        lines.append(
            f"| {r.contender} | {_time(r.median)} | {r.bytes_per_element} | {achieved:.1f} | "
            f"{_fmt(run.percent_of_roofline(r), '.1f')} | {_fmt(run.vs_baseline(r), '.2f')} | "
            f"{_fmt(speedup, '.2f')}{'×' if speedup else ''} | {_fmt(r.state_bytes, '.1f')} | "
            f"{_fmt(r.peak_extra_bytes, '.2f')} | {_fmt(r.host_syncs, 'd')} | {_fmt(r.device_ops, 'd')} |")
    return lines


def sweep_table(run: Run) -> list[str]:
    points = run.workloads(sweep=True)
    if not points:
        return []
    sizes = {w: run.rows_of(w)[0].numel for w in points}
    names = list(dict.fromkeys(r.contender for w in points for r in run.rows_of(w) if r.contender != "copy"))
    lines = ["**Scaling sweep** (LLaMA-shaped, 111 tensors, fp32): nanoseconds per element and step. Flat "
             "rows mean the step time grows linearly with the parameter count.", "",
             "| contender | " + " | ".join(_count(sizes[w]) for w in points) + " |",
             "|---|" + "---|" * len(points)]
    for name in names:
        cells = []
        for w in points:
            r = run.find(w, name)
            cells.append("—" if r is None else f"{r.median / r.numel * 1e9:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def device_ops_table(run: Run) -> list[str]:
    """Device operations per step of every method on every backend, next to torch's AdamW and the official
    packages (one row per method)."""
    rows = run.counted()
    if not rows:
        return []
    first = rows[0]
    backends = [b for b in ("torch", "triton", "cuda") if any(r.family == "lrfree" and r.backend == b for r in rows)]
    lines = [f"**Device operations per step** — kernel launches plus torch ops (`lrfree.device_ops`), at "
             f"{first.workload} ({first.n_tensors} tensors; the count does not depend on the sizes)", "",
             "| method | " + " | ".join(f"lrfree [{b}]" for b in backends) + " | others |",
             "|---|" + "---|" * (len(backends) + 1)]
    rows = [r for r in rows if r.statistic_bytes == 4]  # bf16 state issues the same operations
    for method in dict.fromkeys(r.method for r in rows):
        mine = {r.backend: r.device_ops for r in rows if r.method == method and r.family == "lrfree"}
        others = ", ".join(f"{r.contender} {r.device_ops}" for r in rows if r.method == method and r.family != "lrfree")
        lines.append(f"| {method} | " + " | ".join(_fmt(mine.get(b), "d") for b in backends) + f" | {others or '—'} |")
    return lines


# ---------------------------------------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    text: str
    workload: str          # the workload the target is stated at

    def check(self, run: Run) -> tuple[str, bool] | None:  # measured value, met
        raise NotImplementedError


@dataclass(frozen=True)
class RatioTarget(Target):
    contenders: tuple[str, ...] = ()
    limit: float = 1.0

    def check(self, run):
        rows = [run.find(self.workload, c) for c in self.contenders]
        ratios = [run.vs_baseline(r) for r in rows if r is not None]
        if not ratios or None in ratios:
            return None
        return ", ".join(f"{x:.2f}" for x in ratios), all(x <= self.limit for x in ratios)


@dataclass(frozen=True)
class SpeedupTarget(Target):
    contenders: tuple[str, ...] = ()
    factor: float = 4.0

    def check(self, run):
        rows = [run.find(self.workload, c) for c in self.contenders]
        speedups = [run.speedup_vs_official(r) for r in rows if r is not None]
        if not speedups or None in speedups:
            return None
        return ", ".join(f"{x:.1f}×" for x in speedups), all(x >= self.factor for x in speedups)


@dataclass(frozen=True)
class RooflineTarget(Target):
    percent: float = 95.0

    def check(self, run):
        """Against the bytes the step is built to move: the minimal bytes, plus the non-finite guard's pass
        where the run has it on (roofline.FUSED, the row's implemented bytes)."""
        rows = [r for r in run.rows_of(self.workload) if r.family == "lrfree" and r.backend == "triton"]
        percents = [run.percent_of_roofline(r, r.implemented_bytes) for r in rows]
        if not rows or None in percents:
            return None
        worst = min(zip(percents, rows), key=lambda x: x[0])
        return f"lowest {worst[0]:.1f}% ({worst[1].method})", worst[0] >= self.percent


@dataclass(frozen=True)
class AllocationTarget(Target):
    def check(self, run):
        rows = [r for w in run.workloads() + run.workloads(sweep=True) for r in run.rows_of(w)
                if r.family == "lrfree" and r.backend == "triton" and r.peak_extra_bytes is not None]
        if not rows:
            return None
        worst = max(rows, key=lambda r: r.peak_extra_bytes)
        return f"largest {worst.peak_extra_bytes:.3f} B/param ({worst.contender}, {worst.workload})", \
            worst.peak_extra_bytes < 0.01


BIG, SMALL = "llama-738M-float32", "gpt2-124M-float32"
TRITON_METHODS = ("InexactPolyak", "SPS", "DecSPS", "AdaSPS", "ClippedSGD", "DoG", "LDoG", "DAdaptSGD", "DAdaptAdam",
                  "Prodigy", "COCOB", "Adam", "AdamW", "PSSPS", "PSDASGD")
TARGETS = [
    RooflineTarget("every lrfree method (triton) ≥ 95% of its roofline (minimal bytes, + the guard pass's)", BIG),
    RatioTarget("lrfree AdamW (triton) faster than torch fused AdamW", BIG, ("lrfree.AdamW[triton]",), 1.0),
    RatioTarget("PSDASGD (triton) ≤ 1.15× fused AdamW", BIG, ("lrfree.PSDASGD[triton]",), 1.15),
    RatioTarget("PSDASGD with bf16 state (triton) faster than fused AdamW", BIG,
                ("lrfree.PSDASGD[triton, bf16 state]",), 1.0),
    RatioTarget("PSSPS, InexactPolyak (triton) ≤ 1.2× fused AdamW", BIG,
                ("lrfree.PSSPS[triton]", "lrfree.InexactPolyak[triton]"), 1.2),
    SpeedupTarget("DAdaptAdam, Prodigy (triton) ≥ 4× faster than dadaptation / prodigyopt", BIG,
                  ("lrfree.DAdaptAdam[triton]", "lrfree.Prodigy[triton]"), 4.0),
    RatioTarget("GPT-2 small: whole step ≤ 1.3× fused AdamW (every lrfree method, triton)", SMALL,
                tuple(f"lrfree.{m}[triton]" for m in TRITON_METHODS), 1.3),
    AllocationTarget("no per-step allocation that grows with the parameter count (peak extra < 0.01 B/param)", BIG),
]


FOREACH = "torch.optim.AdamW(foreach=True)"
CPU_WORKLOAD = "gpt2-narrow-float32"  # GPT-2's 148 tensors at width 64: ~0.75M elements (quick mode)


@dataclass(frozen=True)
class CpuRatioTarget(Target):
    """The torch backend on a CPU against torch's foreach AdamW, measured side by side in one run."""
    contenders: tuple[str, ...] = ()
    limit: float = 2.0

    def check(self, run):
        base = run.find(self.workload, FOREACH)
        rows = [run.find(self.workload, c) for c in self.contenders]
        if base is None or None in rows:
            return None
        ratios = [(r.median / base.median, r) for r in rows]
        worst = max(ratios, key=lambda x: x[0])
        return f"highest {worst[0]:.2f}× ({worst[1].method})", worst[0] <= self.limit


@dataclass(frozen=True)
class CpuOfficialTarget(Target):
    """The torch backend no slower than the official package of the same method (speed-up ≥ 1)."""

    def check(self, run):
        rows = [r for r in run.rows_of(self.workload) if r.family == "lrfree" and r.backend == "torch"
                and r.statistic_bytes == 4 and run.speedup_vs_official(r) is not None]
        if not rows:
            return None
        speedups = sorted((run.speedup_vs_official(r), r.method) for r in rows)
        return ", ".join(f"{m} {x:.2f}×" for x, m in speedups), speedups[0][0] >= 1.0


CPU_TARGETS = [
    CpuRatioTarget("every lrfree method (torch backend) ≤ 2× torch.optim.AdamW(foreach=True)", CPU_WORKLOAD,
                   tuple(f"lrfree.{m}[torch]" for m in TRITON_METHODS), 2.0),
    CpuRatioTarget("lrfree AdamW (torch backend) ≤ 1.5× torch.optim.AdamW(foreach=True)", CPU_WORKLOAD,
                   ("lrfree.AdamW[torch]",), 1.5),
    CpuOfficialTarget("no slower than the official package of the same method (speed-up ≥ 1×)", CPU_WORKLOAD),
]


def targets_table(run: Run | None, targets: list[Target] = TARGETS) -> list[str]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    for target in targets:
        result = target.check(run) if run is not None else None
        value, met = (NOT_MEASURED, "—") if result is None else (result[0], "yes" if result[1] else "**no**")
        lines.append(f"| {target.text} | {value} | {met} |")
    return lines


def backend_table(run: Run) -> list[str]:
    """Per method, Triton against the compiled extension on the largest fp32 workload: what ``"auto"``
    should pick (lrfree.backends.AUTO_PREFERS_CUDA records the methods where the extension won)."""
    named = [w for w in run.workloads() if w.endswith("float32")]
    if not named:
        return []
    main = max(named, key=lambda w: run.rows_of(w)[0].numel)
    lines = []
    for method in TRITON_METHODS:
        triton, cuda = run.find(main, f"lrfree.{method}[triton]"), run.find(main, f"lrfree.{method}[cuda]")
        if triton is None or cuda is None:
            continue
        winner = "cuda" if cuda.median < triton.median else "triton"
        lines.append(f"| {method} | {_time(triton.median)} | {_time(cuda.median)} | {triton.median / cuda.median:.2f} | "
                     f"{winner} |")
    if not lines:
        return []
    return [f"**Fused backends on {main}**: Triton against the compiled CUDA extension.", "",
            "| method | triton | cuda | triton / cuda | faster |", "|---|---|---|---|---|", *lines, ""]


# The extension must beat Triton by more than run-to-run noise before "auto" prefers it.
CUDA_MARGIN = 0.97
BACKENDS_SOURCE = os.path.join(os.path.dirname(HERE), "python", "lrfree", "backends", "__init__.py")


def auto_prefers_cuda(run: Run) -> frozenset[str]:
    """The kernels modules (``FusedOptimizer.kernels``) whose every method measured on both fused backends
    ran faster on the CUDA extension (by CUDA_MARGIN) on every named workload of a GPU run."""
    import lrfree
    verdicts: dict[str, list[bool]] = {}
    for workload in run.workloads():
        for method in TRITON_METHODS:
            triton, cuda = run.find(workload, f"lrfree.{method}[triton]"), run.find(workload, f"lrfree.{method}[cuda]")
            if triton is not None and cuda is not None:
                verdicts.setdefault(getattr(lrfree, method).kernels, []).append(
                    cuda.median <= CUDA_MARGIN * triton.median)
    return frozenset(module for module, wins in verdicts.items() if all(wins))


def update_auto_prefers_cuda(modules: frozenset[str], path: str = BACKENDS_SOURCE) -> str:
    """Rewrites the AUTO_PREFERS_CUDA line of lrfree.backends; returns the new line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    inner = "{" + ", ".join(f'"{m}"' for m in sorted(modules)) + "}" if modules else ""
    line = f"AUTO_PREFERS_CUDA: frozenset[str] = frozenset({inner})"
    new, n = re.subn(r"^AUTO_PREFERS_CUDA: frozenset\[str\] = frozenset\(.*\)$", line, text, flags=re.M)
    if n != 1:
        raise ValueError(f"{path}: expected one AUTO_PREFERS_CUDA line, found {n}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return line


# ----------------------------------------------------------------------------------------------- charts

def charts(run: Run) -> list[str]:
    """PNG charts next to the run's JSON; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = os.path.dirname(os.path.abspath(run.path))
    made = []
    named = [w for w in run.workloads() if w.endswith("float32")] or run.workloads()
    if named:
        main = max(named, key=lambda w: run.rows_of(w)[0].numel)
        rows = sorted((r for r in run.rows_of(main) if r.contender != "copy"), key=lambda r: r.median)
        colors = {"lrfree": "tab:blue", "torch": "tab:gray", "official": "tab:orange"}
        for kind in ("step_time", "roofline"):
            values = [r.median * 1e3 for r in rows] if kind == "step_time" else \
                [run.percent_of_roofline(r) or 0.0 for r in rows]
            fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
            ax.barh([r.contender for r in rows], values, color=[colors.get(r.family, "k") for r in rows])
            ax.invert_yaxis()
            if kind == "step_time":
                ax.set_xscale("log")
                ax.set_xlabel("median step time (ms, log scale)")
            else:
                ax.axvline(100, color="k", lw=0.8)
                ax.set_xlabel("% of the copy-bandwidth roofline (minimal bytes of each method)")
            ax.set_title(f"{main} on {run.device}", fontsize=9)
            ax.tick_params(axis="y", labelsize=7)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{kind}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made.append(path)
    points = run.workloads(sweep=True)
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(dict.fromkeys(r.contender for w in points for r in run.rows_of(w) if r.contender != "copy"))
        for name in names:
            rows = [r for w in points if (r := run.find(w, name)) is not None]
            ax.plot([r.numel for r in rows], [r.median * 1e3 for r in rows], marker="o", label=name)
        base = [r for w in points if (r := run.find(w, BASELINE)) is not None]
        if base:  # the slope a step that grows linearly with the parameter count has
            n0, t0 = base[-1].numel, base[-1].median * 1e3
            xs = [r.numel for r in base]
            ax.plot(xs, [t0 * x / n0 for x in xs], "k--", lw=0.8, label="∝ parameters")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (111 tensors)")
        ax.set_ylabel("median step time (ms)")
        ax.set_title(f"scaling on {run.device}", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


# ----------------------------------------------------------------------------------------------- report

HEADER = """# Performance results

Generated by `python bench/report.py` from the pytest-benchmark JSON of each run under `bench/results/`;
do not edit by hand. Every number below was measured in the run it is listed under; what no run measured
says *{nm}*.

How to read the tables: each contender takes one optimizer step on the same LLM-shaped parameters and
random gradients; *median step* includes the device synchronize a training loop waits for. *B/elem* is the
minimal number of bytes the method must move per parameter element (ALGORITHMS §0.1, table below), so
*% of roofline* = B/elem × elements / step time ÷ the copy bandwidth measured on the same sizes in the same
run: an implementation with extra passes (any of them: ours or a reference package's) shows up below
100%. *Speed-up vs official* compares an lrfree method with the package its oracle tests use (dadaptation,
prodigyopt, dog-optimizer, parameterfree). *State* is the bytes the optimizer keeps per parameter; *peak
extra* the memory one step allocates beyond that (CUDA only). *Host syncs* counts the device values one
step reads back (on a CPU run every read counts, including torch.optim's CPU step counters, which cost
no sync on a GPU). *Device ops* counts what one step issues to the device: kernel launches plus every
torch op that does device work, 0-d scalar arithmetic included (`lrfree.device_ops`); on a GPU each is a
launch of a few µs in series with the step, so at small and medium sizes it is what separates fused
steps. The count is the same on a CPU as on a GPU: `test_device_ops` counts every contender, the Triton
backend in its interpreter on a CPU.
""".format(nm=NOT_MEASURED)


def render(runs: list[Run], chart_paths: dict[str, list[str]], out_path: str) -> str:
    out_dir = os.path.dirname(os.path.abspath(out_path))
    lines = [HEADER, "## Bytes per parameter element", "",
             "Minimal: ALGORITHMS §0.1 for each class's default configuration. Fused: what lrfree's Triton "
             "passes load and store, non-finite guard included (derived from the kernels).", "",
             *bytes_table(), ""]
    gpu_runs = [r for r in runs if r.device_type == "cuda"]
    lines += ["## Targets (Triton-backend issue)", ""]
    if gpu_runs:
        for run in gpu_runs:
            lines += [f"Measured on {run.device} ({run.datetime}):", "", *targets_table(run), ""]
    else:
        lines += ["No GPU run has been recorded yet: the targets are stated at LLM scale on a GPU, so every "
                  f"cell is *{NOT_MEASURED}*.", "", *targets_table(None), ""]
    lines += ["Until a GPU measures them, the evidence is static: [KERNELS.md](KERNELS.md) is every kernel "
              "variant compiled ahead of time for an H100 (registers, spills, resident warps per SM, access "
              "widths, bytes per element), and CI holds every method's step to no spills, ≥ 16 resident "
              "warps/SM, 128-bit accesses and the fused bytes of the table above "
              "(tests/test_kernels_compile.py). That predicts the bandwidth a kernel can reach; it is not a "
              "timing.", ""]
    for run in sorted(runs, key=lambda r: (r.device_type != "cuda", r.datetime)):
        versions = ", ".join(f"{k} {v}" for k, v in sorted(run.versions.items()))
        lines += [f"## {run.device} — {run.mode} mode", "",
                  f"Run {run.datetime}; {versions}. Source: `{os.path.relpath(run.path, out_dir)}`.", ""]
        if run.device_type != "cuda":
            lines += ["A CPU run: absolute times say nothing about GPU speed and the Triton backend is not timed "
                      "(only the interpreter runs it on a CPU). What carries over is the ratio between "
                      "implementations of the same math on the same device.", ""]
            if run.find(CPU_WORKLOAD, FOREACH) is not None:
                lines += [f"The torch backend on this CPU ({CPU_WORKLOAD}, side by side in this run):", "",
                          *targets_table(run, CPU_TARGETS), ""]
        counted = device_ops_table(run)
        if counted:
            lines += counted + [""]
        for workload in run.workloads():
            lines += workload_table(run, workload) + [""]
        if run.device_type == "cuda":
            lines += backend_table(run)
        lines += sweep_table(run) + [""]
        for path in chart_paths.get(run.path, []):
            lines += [f"![{os.path.basename(path)}]({os.path.relpath(path, out_dir)})", ""]
    if not gpu_runs:
        lines += ["## GPU", "", f"No GPU run yet: every GPU time, ratio and roofline figure is *{NOT_MEASURED}*. "
                  "Run `python bench/run.py` on a machine with a CUDA GPU to record one.", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="pytest-benchmark JSON files (default: bench/results/*/results.json)")
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--update-auto-prefers-cuda", action="store_true",
                        help="only set lrfree.backends.AUTO_PREFERS_CUDA from the newest GPU run")
    args = parser.parse_args(argv)
    paths = args.runs or sorted(glob.glob(os.path.join(HERE, "results", "*", "results.json")))
    runs = [load(p) for p in paths]
    if args.update_auto_prefers_cuda:
        gpu_runs = sorted((r for r in runs if r.device_type == "cuda"), key=lambda r: r.datetime)
        if not gpu_runs:
            print("no GPU run recorded: AUTO_PREFERS_CUDA left as it is")
            return 0
        print(f"{update_auto_prefers_cuda(auto_prefers_cuda(gpu_runs[-1]))}  # from {gpu_runs[-1].path}")
        return 0
    chart_paths = {} if args.no_charts else {run.path: charts(run) for run in runs}
    text = render(runs, chart_paths, args.out)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {args.out} from {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
