"""Everything the suite times: lrfree methods × backends, torch's Adam/AdamW, and the official packages.

A contender names the *method* it implements, so the report can put lrfree's DAdaptAdam next to the
``dadaptation`` package's and use the method's minimal bytes (roofline.MINIMAL) for everyone. The
official packages are optional: a contender whose package is not installed is skipped with that reason.
Hyperparameters are each method's defaults, except where a method has no default (a horizon, a learning
rate for the fixed-lr baselines) — the values below are typical and do not change the work per step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import lrfree

# methods whose constructor needs an argument the class does not default
LRFREE_KWARGS: dict[str, dict[str, Any]] = {
    "InexactPolyak": {"T": 10_000},
    "ClippedSGD": {"lr": 1e-2, "max_norm": 1.0},
    "Adam": {"lr": 1e-3},
    "AdamW": {"lr": 1e-3, "weight_decay": 0.1},
}
LRFREE_METHODS = ["InexactPolyak", "SPS", "DecSPS", "AdaSPS", "ClippedSGD", "DoG", "LDoG", "DAdaptSGD",
                  "DAdaptAdam", "Prodigy", "COCOB", "Adam", "AdamW", "PSSPS", "PSDASGD"]

# The methods the scaling sweep runs (one fused backend each, plus torch's fused AdamW).
SWEEP_METHODS = ("AdamW", "PSDASGD", "PSSPS", "InexactPolyak", "DAdaptAdam", "Prodigy")
# The methods also timed with their statistics in bf16 (state_dtype=torch.bfloat16, lrfree.precision); the
# GPU check, on a 6-minute budget, times the first two on Triton only (its target: bench/report.py)
BF16_STATE_METHODS = ("PSDASGD", "AdamW", "PSSPS", "Prodigy")


@dataclass(frozen=True)
class Contender:
    name: str
    method: str                # key of roofline.MINIMAL
    family: str                # "lrfree", "torch" or "official"
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer] = field(compare=False)
    backend: str = ""          # lrfree backend, or the torch implementation ("fused", "foreach")
    package: str = ""          # module the contender needs (official packages)
    needs_loss: bool = False
    # what the training loop gives the optimizer besides the gradient, before each step (GLyDER's ĝ)
    before_step: Callable[[torch.optim.Optimizer], None] | None = field(default=None, compare=False)
    state_bytes: int = 4       # bytes per element of each stored statistic (2: state_dtype=torch.bfloat16)

    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        if self.before_step is not None:
            self.before_step(opt)
        if self.needs_loss:
            opt.step(loss=loss)
        else:
            opt.step()

    def unavailable(self) -> str | None:
        """Why this contender cannot run here (a missing package), or None."""
        if self.package:
            try:
                importlib.import_module(self.package)
            except ImportError as exc:
                return f"{self.package} is not installed ({exc}); pip install lrfree[bench]"
        return None


def _lrfree(method: str, backend: str, bf16_state: bool = False) -> Contender:
    cls = getattr(lrfree, method)
    kwargs = {**LRFREE_KWARGS.get(method, {}), **({"state_dtype": torch.bfloat16} if bf16_state else {})}
    label = f"{backend}, bf16 state" if bf16_state else backend
    return Contender(f"lrfree.{method}[{label}]", method, "lrfree",
                     lambda params: cls(params, backend=backend, **kwargs), backend=backend,
                     needs_loss=cls.requires_loss, state_bytes=2 if bf16_state else 4)


def _bf16_state(backends, methods=BF16_STATE_METHODS) -> list[Contender]:
    """``methods`` with bf16 state, on each of ``backends``."""
    return [_lrfree(m, b, bf16_state=True) for m in methods for b in backends if covered(m, b)]


def _glyder(backend: str) -> Contender:
    """GLyDER along the fused Adam direction with the Gauss–Newton–Bartlett curvature. The sampled-label
    gradient ĝ comes from an extra backward the benchmark does not time; a fixed buffer stands in."""
    def give_gnb(opt):
        params = [p for g in opt.param_groups for p in g["params"]]
        if not hasattr(opt, "_bench_gnb"):
            opt._bench_gnb = [p.grad.clone() for p in params]
        opt.set_gnb_gradient(opt._bench_gnb, 4096)

    return Contender(f"lrfree.GLyDER(Adam)[{backend}]", "GLyDER", "lrfree",
                     lambda params: lrfree.GLyDER(lrfree.Adam(params, backend=backend)), backend=backend,
                     before_step=give_gnb)


def _torch(method: str, impl: str) -> Contender:
    cls = getattr(torch.optim, method)
    kwargs = {"lr": 1e-3, **({"weight_decay": 0.1} if method == "AdamW" else {}), impl: True}
    return Contender(f"torch.optim.{method}({impl}=True)", method, "torch", lambda params: cls(params, **kwargs),
                     backend=impl)


def _official(package: str, attr: str, method: str, **kwargs) -> Contender:
    def make(params):
        return getattr(importlib.import_module(package), attr)(params, **kwargs)
    return Contender(f"{package}.{attr}", method, "official", make, package=package)


OFFICIAL = [
    _official("dadaptation", "DAdaptSGD", "DAdaptSGD"),
    _official("dadaptation", "DAdaptAdam", "DAdaptAdam"),
    _official("prodigyopt", "Prodigy", "Prodigy"),
    _official("dog", "DoG", "DoG"),
    _official("dog", "LDoG", "LDoG"),
    _official("parameterfree", "COCOB", "COCOB"),
    _official("pytorch_optimizer", "DAdaptSGD", "DAdaptSGD"),
    _official("pytorch_optimizer", "DAdaptAdam", "DAdaptAdam"),
    _official("pytorch_optimizer", "Prodigy", "Prodigy"),
]
# The implementation each method's speed-up is quoted against (the one its oracle tests compare with).
CANONICAL_OFFICIAL = {"DAdaptSGD": "dadaptation.DAdaptSGD", "DAdaptAdam": "dadaptation.DAdaptAdam",
                      "Prodigy": "prodigyopt.Prodigy", "DoG": "dog.DoG", "LDoG": "dog.LDoG",
                      "COCOB": "parameterfree.COCOB"}
BASELINE = "torch.optim.AdamW(fused=True)"


# The official implementations the GPU check times (bench/gpu_check.sh): the targets' speed-ups are quoted
# against the first two.
CHECK_OFFICIAL = ("dadaptation.DAdaptAdam", "prodigyopt.Prodigy", "dog.DoG")


def contenders(backends: tuple[str, ...], sweep: bool = False, compact: bool = False) -> list[Contender]:
    """Every contender for one workload (``sweep``: the reduced set the scaling sweep runs; ``compact``: the
    GPU check's set — lrfree on its fused backends, torch's AdamW, and CHECK_OFFICIAL)."""
    torch_ones = [_torch("AdamW", "fused"), _torch("AdamW", "foreach"), _torch("Adam", "fused"),
                  _torch("Adam", "foreach")]
    fused = [b for b in backends if b != "torch"] or ["torch"]  # the reduced sets time the fused backends only
    if compact:
        return (torch_ones[:2] + [_lrfree(m, b) for m in LRFREE_METHODS for b in fused if covered(m, b)]
                + _bf16_state([b for b in fused if b == "triton"], BF16_STATE_METHODS[:2])
                + [_glyder(b) for b in fused if b != "cuda"]
                + [c for c in OFFICIAL if c.name in CHECK_OFFICIAL])
    if sweep:
        return [torch_ones[0]] + [_lrfree(m, b) for m in SWEEP_METHODS for b in fused if covered(m, b)] + \
            [c for c in OFFICIAL if c.name in ("dadaptation.DAdaptAdam", "prodigyopt.Prodigy")]
    return (torch_ones + [_lrfree(m, b) for m in LRFREE_METHODS for b in backends if covered(m, b)]
            + _bf16_state(backends) + [_glyder(b) for b in backends if b != "cuda"] + OFFICIAL)


def backends_for(device: torch.device, mode: str) -> tuple[str, ...]:
    """Triton and the compiled extension are timed on a GPU; in smoke mode on a CPU they run (Triton's
    interpreter, the extension's host build) only so that their code paths stay covered."""
    if device.type == "cuda" or mode == "smoke":
        return ("torch", "triton", "cuda")
    return ("torch",)


def covered(method: str, backend: str) -> bool:
    """The compiled extension runs only the methods whose kernels it has."""
    if backend != "cuda":
        return True
    from lrfree.backends import cuda_ext
    return getattr(lrfree, method).kernels in cuda_ext.COVERED_MODULES
