"""Run the benchmark suite and write the report: ``python bench/run.py [--mode MODE] [pytest args]``.

The run's pytest-benchmark JSON goes to ``bench/results/<device>-<mode>/results.json`` (a later run on the
same device and mode replaces it), its charts beside it, and ``bench/RESULTS.md`` is regenerated from every
run recorded under ``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    # as conftest.py does, but before report (through lrfree) imports Triton: Triton's own @jit helpers
    # (tl.sum's combine function, say) are interpreted only if TRITON_INTERPRET is set when it is
    # imported, and every interpreted kernel of the CPU run failed without it
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LRFREE_CUDA_HOST", "1")

import pytest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import environment  # noqa: E402
import report  # noqa: E402
import workloads  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=workloads.MODES, default=None,
                        help="workload sizes (default: full on a GPU, quick on a CPU; check: bench/gpu_check.sh's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--only", default="", help="comma-separated substrings of contender names")
    args, pytest_args = parser.parse_known_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = args.mode or ("full" if device.type == "cuda" else "quick")
    out = environment.results_dir(device, mode)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "results.json")
    code = pytest.main([HERE, "-q", "-p", "no:cacheprovider", f"--bench-mode={mode}", f"--bench-device={device}",
                        f"--bench-only={args.only}", f"--benchmark-json={json_path}",
                        "--benchmark-columns=median,iqr,rounds", "--benchmark-sort=name", *pytest_args])
    if code not in (0, 5) or not os.path.exists(json_path):
        print(f"benchmark run failed (pytest exit code {int(code)}); report not written", file=sys.stderr)
        return int(code) or 1
    return report.main([])


if __name__ == "__main__":
    sys.exit(main())
