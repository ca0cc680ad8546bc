"""Every kernel variant lrfree can launch, compiled ahead of time for sm_80 and sm_90 (no GPU needed).

Run as a script (it needs Triton's JIT, so ``TRITON_INTERPRET`` must be unset)::

    python tests/kernel_variants.py --arch 80,90 --json OUT.json

The variants are those the methods really launch: every optimizer of ``optimizer_db`` in each of its
``kernel_variants`` (and GLyDER's estimators), with fp32, bf16, fp16 and fp64 parameters, stochastic
rounding, master weights, bf16 state and the non-finite guard on and off, stepped three times on CPU tensors whose
launches are recorded instead of run (``lrfree.kernels.aot``). Each distinct specialization is compiled
once per architecture. The JSON holds every compiled variant's analysis and, per scenario and architecture,
the launches of each step as [variant id, grid]; ``test_kernels_compile`` checks it and
``bench/kernels.py`` renders it as ``bench/KERNELS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# name -> (parameter dtype, stochastic_rounding, master_weights, skip_nonfinite, state_dtype)
PRECISIONS = {
    "fp32": ("float32", False, False, True, None),
    "fp32-noguard": ("float32", False, False, False, None),
    "fp32-bf16state": ("float32", False, False, True, "bfloat16"),
    "fp32-bf16state-noguard": ("float32", False, False, False, "bfloat16"),
    "bf16": ("bfloat16", False, False, True, None),
    "bf16-sr": ("bfloat16", True, False, True, None),
    "bf16-sr-bf16state": ("bfloat16", True, False, True, "bfloat16"),
    "bf16-master": ("bfloat16", False, True, True, None),
    "fp16": ("float16", False, False, True, None),
    "fp64": ("float64", False, False, True, None),
}
STEPS = 3  # the last one is the steady state (first-step-only launches are done)
# Tensor sizes: aligned ones (128-bit accesses) in a few blocks, and one whose size is not a multiple of 16
# (the scalar fallback). ``LONG`` adds a tensor long enough for the two-level per-tensor reduction.
SIZES = (64 * 48, 4096 + 2048, 16, 1371)
LONG = 2049 * 2048 + 16


def scenarios():
    """(label, precision, make(params, **options) -> optimizer, before_step(opt) or None)."""
    import lrfree
    from optimizer_db import GLYDER_VARIANTS, OPTIMIZERS
    out = []
    for info in OPTIMIZERS:
        for i, variant in enumerate(info.kernel_variants):
            label = info.name + ("" if not variant else "[" + ",".join(f"{k}={v}" for k, v in variant.items()) + "]")
            out.append((label, info.name, lambda params, _i=info, _v=variant, **kw: _i.make(params, **_v, **kw), None))
    for variant in GLYDER_VARIANTS:
        options = {k: v for k, v in variant.items() if k not in ("base", "base_kwargs")}
        label = f"GLyDER({variant['base'].__name__})[{','.join(f'{k}={v}' for k, v in options.items())}]"

        def make(params, _v=variant, _o=options, skip_nonfinite=True, **kw):
            base = _v["base"](params, **_v["base_kwargs"], skip_nonfinite=skip_nonfinite, **kw)
            return lrfree.GLyDER(base, skip_nonfinite=skip_nonfinite, **_o)

        def before(opt):
            import torch
            params = [p for g in opt.param_groups for p in g["params"]]
            if opt.curvature == "gnb":
                opt.set_gnb_gradient([torch.ones_like(p) for p in params], 8)
            if opt.gradient == "split":
                opt._probe = opt._buffers("split_backward", [torch.ones_like(p) for p in params])
        out.append((label, "GLyDER", make, before))
    return out


def record_all(long_tensor: bool = True) -> dict:
    """{(scenario label, precision): [launches of step 0, 1, 2]} and the launches, all on CPU tensors."""
    import torch
    from lrfree.kernels import aot
    runs = {}
    for label, method, make, before in scenarios():
        for precision, (dtype_name, sr, master, guard, state_dtype) in PRECISIONS.items():
            dtype = getattr(torch, dtype_name)
            gen = torch.Generator().manual_seed(0)
            sizes = SIZES + ((LONG,) if long_tensor and precision == "fp32" and label == method else ())
            options = dict(backend="triton", skip_nonfinite=guard)
            if sr:
                options["stochastic_rounding"] = True
            if master:
                options["master_weights"] = True
            if state_dtype:
                options["state_dtype"] = getattr(torch, state_dtype)
            with aot.recording() as rec:
                params = []
                for n in sizes:
                    p = torch.nn.Parameter((torch.randn(n, generator=gen) * 0.02).to(dtype))
                    p.grad = (torch.randn(n, generator=gen) * 1e-3).to(dtype)
                    params.append(p)
                opt = make(params, **options)
                steps = []
                for _ in range(STEPS):
                    first = len(rec.launches)
                    if before is not None:
                        before(opt)
                    opt.step(loss=torch.tensor(2.0)) if opt.requires_loss else opt.step()
                    steps.append(rec.launches[first:])
            runs[(label, precision)] = steps
    return runs


def compile_all(runs: dict, archs: list[int], jobs: int = 2) -> dict:
    from lrfree.kernels import aot
    result = {"variants": {}, "scenarios": {}}
    for arch in archs:
        spec = aot.Specializer(arch)
        unique = {}
        for steps in runs.values():
            for step in steps:
                for launch in step:
                    unique.setdefault(aot.variant_key(launch, spec), launch)

        def work(item):
            key, launch = item
            try:
                compiled = aot.compile_launch(launch, spec)
                return key, dataclasses.asdict(aot.analyze(compiled, launch, spec))
            except Exception as exc:  # the compiler's error, reported per variant
                lines = [line for line in str(exc).strip().splitlines() if line.strip()]
                return key, {"name": launch.name, "constexprs": aot.constexpr_names(launch, spec), "arch": arch,
                             "error": f"{type(exc).__name__}: {lines[-1] if lines else ''}"}

        with ThreadPoolExecutor(jobs) as pool:
            done = dict(pool.map(work, unique.items()))
        ids = {}
        for key, analysis in done.items():
            ids[key] = f"sm{arch}/{len(ids)}"
            result["variants"][ids[key]] = analysis
        for (label, precision), steps in runs.items():
            entry = result["scenarios"].setdefault(f"{label}|{precision}", {"label": label, "precision": precision})
            entry[f"sm{arch}"] = [[[ids[aot.variant_key(launch, spec)], launch.grid[0]] for launch in step]
                                  for step in steps]
    return result


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_variants.py compiles kernels: run it with TRITON_INTERPRET unset")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="80,90")
    parser.add_argument("--json", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    import triton
    import torch
    started = time.time()
    runs = record_all()
    recorded = time.time()
    result = compile_all(runs, [int(a) for a in args.arch.split(",")], args.jobs)
    result.update(triton=triton.__version__, torch=torch.__version__, record_s=round(recorded - started, 1),
                  compile_s=round(time.time() - recorded, 1))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    errors = sum("error" in v for v in result["variants"].values())
    print(f"{len(result['variants'])} variants compiled for sm_{args.arch} with Triton {triton.__version__} "
          f"({errors} failed) in {result['compile_s']} s (recording {result['record_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
