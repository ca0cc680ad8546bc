"""The optimizer database the test matrix is generated from (in the spirit of torch's OptimizerInfo).

``OPTIMIZERS`` lists every public optimizer class once with the arguments it needs to be constructed
generically. ``REFERENCE_CASES`` pairs an lrfree configuration with an independent implementation of
the same method (the official package where one exists, else a transcription from ``oracles``) and says
which internal scalars must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import lrfree
from oracles import (FlatAdaSps, FlatDecSps, FlatInexactPolyak, FlatPSDASgd, FlatPSSps, FlatSps, ReferenceDecSps,
                     ReferenceSps)

import dadaptation
import dog
import parameterfree
import prodigyopt


@dataclass(frozen=True)
class OptimizerInfo:
    cls: type
    kwargs: dict = field(default_factory=dict)  # what a generic construction needs (T, lr, max_norm, ...)
    # options that change the compile-time constants of the method's kernels (on top of ``kwargs``): the
    # ahead-of-time compile check (test_kernels_compile) compiles the kernels of each, in every dtype
    kernel_variants: tuple = ({},)

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def needs_loss(self) -> bool:
        return self.cls.requires_loss

    def make(self, params, **overrides):
        return self.cls(params, **{**self.kwargs, **overrides})


def require_backend(cls: type, backend: str) -> None:
    """Skip a test case whose backend cannot run ``cls`` here: the compiled extension does not cover the
    method, or cannot be built (its host emulation serves CPU tensors when there is no GPU)."""
    if backend != "cuda":
        return
    from lrfree.backends import cuda_ext
    if cls.kernels not in cuda_ext.COVERED_MODULES:
        pytest.skip(f"the compiled extension does not cover {cls.__name__}")
    reason = cuda_ext.unavailable_reason(cuda_ext.target_for(torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")))
    if reason:
        pytest.skip(reason)


OPTIMIZERS = [
    OptimizerInfo(lrfree.InexactPolyak, {"T": 100}, kernel_variants=({}, {"best_iterate": True})),
    OptimizerInfo(lrfree.PSSPS, kernel_variants=({}, {"betas": (0.9, 0.999)}, {"amsgrad": True},
                                                 {"scaling": "none"}, {"weight_decay": 0.1})),
    # primal averaging (momentum) runs with β1 = 0: with the gradient EMA it is refused
    OptimizerInfo(lrfree.PSDASGD, kernel_variants=({}, {"betas": (0.0, 0.999)}, {"amsgrad": True},
                                                   {"momentum": 0.9, "betas": (0.0, 0.999)}, {"scaling": "none"},
                                                   {"weight_decay": 0.1})),
    OptimizerInfo(lrfree.SPS),
    OptimizerInfo(lrfree.DecSPS),
    OptimizerInfo(lrfree.AdaSPS),
    OptimizerInfo(lrfree.ClippedSGD, {"lr": 0.1, "max_norm": 1.0}, kernel_variants=({}, {"momentum": 0.9})),
    OptimizerInfo(lrfree.DoG, kernel_variants=({}, {"weight_decay": 0.1})),
    OptimizerInfo(lrfree.LDoG, kernel_variants=({}, {"weight_decay": 0.1})),
    OptimizerInfo(lrfree.DAdaptSGD, kernel_variants=({}, {"momentum": 0.9, "weight_decay": 0.1})),
    OptimizerInfo(lrfree.DAdaptAdam, kernel_variants=({}, {"decouple": True, "weight_decay": 0.1})),
    OptimizerInfo(lrfree.Prodigy, kernel_variants=({}, {"decouple": False}, {"betas": (0.0, 0.999)},
                                                   {"slice_p": 11})),
    OptimizerInfo(lrfree.COCOB),
    OptimizerInfo(lrfree.Adam, kernel_variants=({}, {"amsgrad": True}, {"weight_decay": 0.1})),
    OptimizerInfo(lrfree.AdamW, kernel_variants=({}, {"amsgrad": True})),
]
# GLyDER's fused Adam direction: its estimators change which streams its kernels read
GLYDER_VARIANTS = (
    {"base": lrfree.Adam, "base_kwargs": {"lr": 1e-3}, "gradient": "batch", "curvature": "gnb"},
    {"base": lrfree.AdamW, "base_kwargs": {"lr": 1e-3, "weight_decay": 0.1, "amsgrad": True}, "gradient": "split",
     "curvature": "gnb"},
    {"base": lrfree.Adam, "base_kwargs": {"lr": 1e-3, "weight_decay": 0.1}, "gradient": "batch",
     "curvature": "constant", "smoothness": 10.0},
)
BY_NAME = {info.name: info for info in OPTIMIZERS}


class ClipThenSGD(torch.optim.SGD):
    """``clip_grad_norm_`` over every parameter followed by ``torch.optim.SGD``: ClippedSGD's oracle."""

    def __init__(self, params, max_norm, **kw):
        super().__init__(params, **kw)
        self.max_norm = max_norm

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.last_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        return super().step()


def _group(i: int, key: str):
    return lambda ref: ref.param_groups[i][key]


def _g0(key: str):
    return _group(0, key)


@dataclass(frozen=True)
class ReferenceCase:
    id: str
    ours: Callable  # param_groups -> lrfree optimizer
    reference: Callable  # param_groups -> reference optimizer (step() or step(loss))
    scalars: dict = field(default_factory=dict)  # lrfree scalar name -> getter on the reference
    group1: dict = field(default_factory=dict)  # per-group overrides of the second group (both sides)
    zero_fill_none: bool = False  # the reference crashes on None grads: give it zeros instead
    reference_takes_loss: bool = False
    # Flat-vector oracles cannot share lrfree's summation order, and on this loss (whose optimum is
    # not attained) Polyak-type steps are chaotic: 1-ulp differences grow ~e^(0.15 t). These cases
    # start every step from the oracle's exact parameters, so rounding cannot feed back through the
    # gradients, while all optimizer state evolves independently in each implementation.
    sync_params: bool = False


WD = {"weight_decay": 0.01}
REFERENCE_CASES = [
    # --- official packages -------------------------------------------------------------------------
    ReferenceCase("DAdaptSGD", lambda g: lrfree.DAdaptSGD(g), lambda g: dadaptation.DAdaptSGD(g),
                  {"d": _g0("d"), "numerator": _g0("numerator_weighted"), "g0_norm": _g0("g0_norm")}),
    ReferenceCase("DAdaptSGD-momentum-wd", lambda g: lrfree.DAdaptSGD(g, momentum=0.9, weight_decay=1e-3),
                  lambda g: dadaptation.DAdaptSGD(g, momentum=0.9, weight_decay=1e-3), {"d": _g0("d")}),
    ReferenceCase("DAdaptSGD-growth", lambda g: lrfree.DAdaptSGD(g, growth_rate=1.02, d0=1e-4),
                  lambda g: dadaptation.DAdaptSGD(g, growth_rate=1.02, d0=1e-4), {"d": _g0("d")}),
    ReferenceCase("DAdaptAdam", lambda g: lrfree.DAdaptAdam(g), lambda g: dadaptation.DAdaptAdam(g),
                  {"d": _g0("d"), "numerator": _g0("numerator_weighted")}),
    ReferenceCase("DAdaptAdam-coupled-wd-layer-scale", lambda g: lrfree.DAdaptAdam(g),
                  lambda g: dadaptation.DAdaptAdam(g), {"d": _g0("d")}, group1={**WD, "layer_scale": 0.5}),
    ReferenceCase("DAdaptAdam-decoupled-bc-growth",
                  lambda g: lrfree.DAdaptAdam(g, decouple=True, use_bias_correction=True, growth_rate=1.02),
                  lambda g: dadaptation.DAdaptAdam(g, decouple=True, use_bias_correction=True, growth_rate=1.02),
                  {"d": _g0("d")}, group1=WD),
    ReferenceCase("Prodigy", lambda g: lrfree.Prodigy(g), lambda g: prodigyopt.Prodigy(g),
                  {"d": _g0("d"), "d_max": _g0("d_max"), "numerator": _g0("d_numerator"),
                   "denominator": _g0("d_denom"), "d_hat": _g0("d_hat")}, group1=WD),
    ReferenceCase("Prodigy-coupled-sliced-nobeta1",
                  lambda g: lrfree.Prodigy(g, betas=(0.0, 0.99), decouple=False, use_bias_correction=True,
                                           safeguard_warmup=True, slice_p=3),
                  lambda g: prodigyopt.Prodigy(g, betas=(0.0, 0.99), decouple=False, use_bias_correction=True,
                                               safeguard_warmup=True, slice_p=3),
                  {"d": _g0("d")}, group1=WD),
    ReferenceCase("Prodigy-growth-dcoef", lambda g: lrfree.Prodigy(g, growth_rate=1.02, d_coef=2.0, beta3=0.9),
                  lambda g: prodigyopt.Prodigy(g, growth_rate=1.02, d_coef=2.0, beta3=0.9), {"d": _g0("d")}),
    ReferenceCase("DoG", lambda g: lrfree.DoG(g), lambda g: dog.DoG(g),
                  {"rbar": lambda r: [gr["rbar"] for gr in r.param_groups],
                   "G": lambda r: [gr["G"] for gr in r.param_groups]}, group1=WD, zero_fill_none=True),
    ReferenceCase("DoG-init-eta", lambda g: lrfree.DoG(g, init_eta=1e-3), lambda g: dog.DoG(g, init_eta=1e-3),
                  {"rbar": lambda r: [gr["rbar"] for gr in r.param_groups]}, zero_fill_none=True),
    ReferenceCase("LDoG", lambda g: lrfree.LDoG(g), lambda g: dog.LDoG(g),
                  {"rbar": lambda r: torch.cat([gr["rbar"] for gr in r.param_groups]),
                   "G": lambda r: torch.cat([gr["G"] for gr in r.param_groups])}, group1=WD, zero_fill_none=True),
    ReferenceCase("COCOB", lambda g: lrfree.COCOB(g), lambda g: parameterfree.COCOB(g), group1=WD),
    ReferenceCase("Adam-amsgrad", lambda g: lrfree.Adam(g, lr=1e-2, amsgrad=True),
                  lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True, foreach=False), group1=WD),
    ReferenceCase("Adam-maximize", lambda g: lrfree.Adam(g, lr=1e-2, maximize=True),
                  lambda g: torch.optim.Adam(g, lr=1e-2, maximize=True, foreach=False)),
    ReferenceCase("AdamW", lambda g: lrfree.AdamW(g, lr=1e-2), lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False),
                  group1={"weight_decay": 0.1}),
    ReferenceCase("ClippedSGD-momentum-wd",
                  lambda g: lrfree.ClippedSGD(g, lr=0.05, max_norm=0.5, momentum=0.9, weight_decay=1e-3),
                  lambda g: ClipThenSGD(g, 0.5, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False),
                  {"grad_norm": lambda r: r.last_norm}),
    ReferenceCase("ClippedSGD-nesterov", lambda g: lrfree.ClippedSGD(g, lr=0.05, max_norm=0.3, momentum=0.5,
                                                                     nesterov=True),
                  lambda g: ClipThenSGD(g, 0.3, lr=0.05, momentum=0.5, nesterov=True, foreach=False)),
    # --- transcriptions of the authors' code (no PyPI package) ---------------------------------------
    ReferenceCase("SPS-smooth-quirks", lambda g: lrfree.SPS(g, reference_quirks=True, n_batches_per_epoch=20),
                  lambda g: ReferenceSps(g, n_batches_per_epoch=20), {"step_size": lambda r: r.step_size},
                  reference_takes_loss=True),
    ReferenceCase("SPS-constant-quirks",
                  lambda g: lrfree.SPS(g, c=0.2, f_star=0.1, eta_max=2.0, adapt_flag="constant", reference_quirks=True),
                  lambda g: ReferenceSps(g, c=0.2, fstar=0.1, eta_max=2.0, adapt_flag="constant"),
                  {"step_size": lambda r: r.step_size}, reference_takes_loss=True),
    ReferenceCase("DecSPS-quirks", lambda g: lrfree.DecSPS(g, c0=2.0, gamma_b=5.0, reference_quirks=True),
                  lambda g: ReferenceDecSps(g, c_init=2.0, gamma_max=5.0), reference_takes_loss=True),
    # --- fp64 flat-vector transcriptions of the documented rules -------------------------------------
    ReferenceCase("SPS-smooth", lambda g: lrfree.SPS(g, f_star=0.2, eta_max=5.0, n_batches_per_epoch=20),
                  lambda g: FlatSps(g, f_star=0.2, eta_max=5.0, n=20), reference_takes_loss=True, sync_params=True),
    ReferenceCase("SPS-constant", lambda g: lrfree.SPS(g, adapt_flag="constant", f_star=0.1),
                  lambda g: FlatSps(g, adapt_flag="constant", f_star=0.1), reference_takes_loss=True, sync_params=True),
    ReferenceCase("DecSPS", lambda g: lrfree.DecSPS(g, c0=2.0, gamma_b=5.0, lower_bound=0.1),
                  lambda g: FlatDecSps(g, c0=2.0, gamma_b=5.0, lower_bound=0.1), reference_takes_loss=True, sync_params=True),
    ReferenceCase("AdaSPS", lambda g: lrfree.AdaSPS(g, c_p=0.5), lambda g: FlatAdaSps(g, c_p=0.5),
                  reference_takes_loss=True, sync_params=True),
    ReferenceCase("InexactPolyak", lambda g: lrfree.InexactPolyak(g, T=200, lower_bound=0.1),
                  lambda g: FlatInexactPolyak(g, T=200, lower_bound=0.1), {"step_size": lambda r: r.step_size},
                  reference_takes_loss=True, sync_params=True),
    ReferenceCase("PSSPS", lambda g: lrfree.PSSPS(g, n_batches_per_epoch=20),
                  lambda g: FlatPSSps(g, n=20), {"step_size": lambda r: r.step_size}, reference_takes_loss=True, sync_params=True),
    ReferenceCase("PSSPS-momentum-amsgrad-uncapped",
                  lambda g: lrfree.PSSPS(g, betas=(0.9, 0.99), amsgrad=True, smooth=False, f_star=0.3),
                  lambda g: FlatPSSps(g, betas=(0.9, 0.99), amsgrad=True, smooth=False, f_star=0.3),
                  reference_takes_loss=True, sync_params=True),
    ReferenceCase("PSDASGD", lambda g: lrfree.PSDASGD(g), lambda g: FlatPSDASgd(g), {"d": lambda r: r.d}, sync_params=True),
    ReferenceCase("PSDASGD-averaging-amsgrad-growth",
                  lambda g: lrfree.PSDASGD(g, momentum=0.9, betas=(0.0, 0.99), amsgrad=True, growth_rate=1.05),
                  lambda g: FlatPSDASgd(g, momentum=0.9, betas=(0.0, 0.99), amsgrad=True, growth_rate=1.05),
                  {"d": lambda r: r.d}, sync_params=True),
]
