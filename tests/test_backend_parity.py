"""Every method's fused backends (Triton, and the compiled extension where it covers the method) against
the torch reference backend.

Without a GPU the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``) and the
extension's kernels in its host build, a CPU emulation of the GPU launch (``LRFREE_CUDA_HOST=1``; both set
in conftest); with a GPU both run on CUDA. Accuracy follows the project's rule: from the same parameters, the fused
step's error against an fp64 reference step may be at most 2× the error of the torch backend computed in
the same low precision (plus a floor of a few units in the last place). In fp64 the two backends agree
to 1e-12. The tensor set is the awkward model plus a tensor that spans several kernel blocks.
"""

import math

import pytest
import torch

import lrfree
from lrfree.backends import cuda_ext
from awkward import loss_fn, make_params, param_groups
from conftest import rel_err
from optimizer_db import require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FUSED = {
    "InexactPolyak": lambda g, **kw: lrfree.InexactPolyak(g, T=50, **kw),
    "InexactPolyak-best": lambda g, **kw: lrfree.InexactPolyak(g, T=50, best_iterate=True, **kw),
    "SPS": lambda g, **kw: lrfree.SPS(g, f_star=0.1, n_batches_per_epoch=5, **kw),
    "DecSPS": lambda g, **kw: lrfree.DecSPS(g, lower_bound=0.1, **kw),
    "AdaSPS": lambda g, **kw: lrfree.AdaSPS(g, **kw),
    "ClippedSGD": lambda g, **kw: lrfree.ClippedSGD(g, lr=0.1, max_norm=0.5, **kw),
    "DoG": lambda g, **kw: lrfree.DoG(g, **kw),
    "LDoG": lambda g, **kw: lrfree.LDoG(g, **kw),
    "DAdaptSGD": lambda g, **kw: lrfree.DAdaptSGD(g, momentum=0.9, weight_decay=1e-3, **kw),
    "DAdaptAdam": lambda g, **kw: lrfree.DAdaptAdam(g, **kw),
    "DAdaptAdam-decoupled": lambda g, **kw: lrfree.DAdaptAdam(g, decouple=True, use_bias_correction=True, **kw),
    "Prodigy": lambda g, **kw: lrfree.Prodigy(g, **kw),
    "Prodigy-sliced-coupled-nobeta1": lambda g, **kw: lrfree.Prodigy(g, betas=(0.0, 0.99), decouple=False,
                                                                     safeguard_warmup=True, slice_p=3, **kw),
    "COCOB": lambda g, **kw: lrfree.COCOB(g, **kw),
    "Adam": lambda g, **kw: lrfree.Adam(g, lr=1e-2, amsgrad=True, **kw),
    "AdamW": lambda g, **kw: lrfree.AdamW(g, lr=1e-2, **kw),
    "PSDASGD": lambda g, **kw: lrfree.PSDASGD(g, **kw),
    "PSDASGD-averaging-amsgrad": lambda g, **kw: lrfree.PSDASGD(g, momentum=0.9, betas=(0.0, 0.99), amsgrad=True,
                                                                growth_rate=1.05, **kw),
    "PSDASGD-unscaled": lambda g, **kw: lrfree.PSDASGD(g, scaling="none", **kw),
    "PSSPS": lambda g, **kw: lrfree.PSSPS(g, n_batches_per_epoch=5, **kw),
    "PSSPS-momentum-amsgrad": lambda g, **kw: lrfree.PSSPS(g, betas=(0.9, 0.99), amsgrad=True, smooth=False,
                                                           f_star=0.2, **kw),
}
GROUP1 = {  # per-group options that exercise per-tensor coefficient vectors (lr: a ratio of the shared step)
    "ClippedSGD": {"momentum": 0.9, "weight_decay": 1e-2, "nesterov": True, "max_norm": 0.2, "eps": 1e-3},
    "DoG": {"weight_decay": 1e-2},
    "LDoG": {"weight_decay": 1e-2},
    "DAdaptSGD": {"lr": 0.3},
    "DAdaptAdam": {"weight_decay": 1e-2, "layer_scale": 0.5, "eps": 1e-6, "lr": 0.4},
    "Prodigy": {"weight_decay": 1e-2, "d0": 1e-5, "eps": 1e-6, "lr": 0.4},
    "COCOB": {"weight_decay": 1e-2, "lr": 0.5, "alpha": 20.0, "eps": 1e-6},
    "Adam": {"weight_decay": 1e-2, "betas": (0.8, 0.99), "maximize": True, "amsgrad": False},
    "AdamW": {"weight_decay": 0.1, "lr": 3e-2},
    "PSDASGD": {"weight_decay": 1e-2, "lr": 0.4, "amsgrad": True},
    # per-group averaging needs the EMA off (betas=(0.0, ...)): group 0 averages with 0.9, this one with 0.5
    "PSDASGD-averaging-amsgrad": {"weight_decay": 1e-2, "lr": 0.4, "momentum": 0.5, "amsgrad": False},
    "PSSPS": {"weight_decay": 1e-2, "lr": 0.5},
}
FLOOR = {torch.float32: 4e-7, torch.bfloat16: 8e-3, torch.float64: 0.0}


def method(name):
    return getattr(lrfree, name.split("-")[0])


def fused_cases(names):
    """(name, backend) for Triton and, where the extension covers the method, the extension."""
    return [pytest.param(n, b, id=f"{n}-{b}") for b in ("triton", "cuda") for n in sorted(names)
            if b == "triton" or method(n).kernels in cuda_ext.COVERED_MODULES]

STEPS = 4


def make(name, dtype, backend):
    params = make_params(dtype, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    # a tensor over several kernel blocks, with 16·k elements: its kernels take the 128-bit (ALIGNED) path,
    # while the awkward model's odd sizes take the scalar one
    params["wide"] = (torch.randn(3, 1376, generator=g, dtype=torch.float64) * 0.1).to(DEVICE, dtype).requires_grad_()
    groups = param_groups({k: v for k, v in params.items() if k != "wide"}, GROUP1.get(name, GROUP1.get(name.split("-")[0])))
    groups[1]["params"].append(params["wide"])
    return params, FUSED[name](groups, backend=backend)


def step(opt, params, t):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn({k: v for k, v in params.items() if k != "wide"}, t) + 0.05 * (params["wide"].float() ** 2).mean()
    loss.backward()
    opt.step(loss=loss)


def sync(dst, src):
    with torch.no_grad():
        for k, p in dst.items():
            p.copy_(src[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, backend", fused_cases(FUSED))
def test_fused_error_is_at_most_twice_the_reference_error(name, backend, dtype):
    require_backend(method(name), backend)
    truth_p, truth = make(name, torch.float64, "torch")
    ref_p, ref = make(name, dtype, "torch")
    fused_p, fused = make(name, dtype, backend)
    assert fused.backend == backend
    for t in range(STEPS):
        sync(ref_p, truth_p)
        sync(fused_p, truth_p)
        for opt, params in ((truth, truth_p), (ref, ref_p), (fused, fused_p)):
            step(opt, params, t)
        for k in truth_p:
            exact = truth_p[k].detach()
            fused_err = rel_err(fused_p[k].detach(), exact)
            ref_err = rel_err(ref_p[k].detach(), exact)
            assert fused_err <= 2 * ref_err + FLOOR[dtype], (
                f"step {t}: {k} fused error {fused_err:.2e} vs reference error {ref_err:.2e}")


@pytest.mark.parametrize("name, backend", fused_cases(FUSED))
def test_fp64_backends_agree(name, backend):
    require_backend(method(name), backend)
    ref_p, ref = make(name, torch.float64, "torch")
    fused_p, fused = make(name, torch.float64, backend)
    for t in range(STEPS):
        sync(fused_p, ref_p)
        step(ref, ref_p, t)
        step(fused, fused_p, t)
        for k in ref_p:
            assert rel_err(fused_p[k].detach(), ref_p[k].detach()) <= 1e-12, (t, k)
        fs, rs = fused.scalars(), ref.scalars()
        for k in rs:
            assert torch.allclose(fs[k].cpu(), rs[k].cpu(), rtol=1e-11, atol=0, equal_nan=True), (t, k)


@pytest.mark.parametrize("name, backend", fused_cases(FUSED))
def test_fused_runs_are_bit_identical_and_skip_nonfinite_steps(name, backend):
    require_backend(method(name), backend)
    runs = []
    for _ in range(2):
        params, opt = make(name, torch.float32, backend)
        for t in range(2):
            step(opt, params, t)
        before = {k: v.detach().clone() for k, v in params.items()}
        state_before = [(p, k, v.clone()) for p, st in opt.state.items() for k, v in st.items()
                        if isinstance(v, torch.Tensor)]
        opt.zero_grad()
        loss = loss_fn({k: v for k, v in params.items() if k != "wide"}, 9) + (params["wide"] ** 2).mean()
        loss.backward()
        params["wide"].grad.view(-1)[2500] = math.nan
        opt.step(loss=loss)
        assert all(torch.equal(before[k], params[k]) for k in params)
        for p, k, v in state_before:  # nor is any state touched
            assert torch.equal(opt.state[p][k], v), k
        assert float(opt.scalars()["skipped"]) == 1.0
        runs.append(params)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_every_optimizer_has_a_fused_path():
    from optimizer_db import OPTIMIZERS
    covered = {name.split("-")[0] for name in FUSED}
    assert {info.name for info in OPTIMIZERS} <= covered


@pytest.mark.parametrize("name, backend", fused_cases(["InexactPolyak", "DoG", "LDoG", "DAdaptAdam", "Prodigy",
                                                        "PSDASGD", "Adam"]))
def test_launches_do_not_grow_with_the_number_of_tensors(name, backend):
    from lrfree.kernels import multi_tensor
    require_backend(method(name), backend)

    def launches(n_tensors):
        # odd sizes (none a multiple of 16): one alignment class, so one launch per pass
        params = [torch.randn(37 + 16 * i, device=DEVICE, requires_grad=True) for i in range(n_tensors)]
        opt = FUSED[name]([{"params": params}], backend=backend)
        counts = []
        for _ in range(2):
            opt.zero_grad()
            loss = sum((p * p).sum() for p in params)
            loss.backward()
            before = multi_tensor.launch_count
            opt.step(loss=loss)
            counts.append(multi_tensor.launch_count - before)
        return counts[-1]

    assert launches(3) == launches(24) <= 8


@pytest.mark.parametrize("name, backend", fused_cases(["DAdaptAdam", "Prodigy", "PSDASGD", "LDoG", "Adam", "COCOB"]))
def test_mixed_dtypes_and_a_frozen_group(name, backend):
    """fp32 and bf16 parameters in one optimizer (one launch each, results reassembled in order) and a
    group with lr = 0: the fused step matches the reference step from the same parameters."""
    def build(backend):
        g = torch.Generator().manual_seed(3)
        full = [(torch.randn(n, generator=g) * 0.3).to(DEVICE).requires_grad_() for n in (700, 3, 2100)]
        half = [(torch.randn(n, generator=g) * 0.3).to(DEVICE, torch.bfloat16).requires_grad_() for n in (5, 2049)]
        frozen = [(torch.randn(9, generator=g) * 0.3).to(DEVICE).requires_grad_()]
        groups = [{"params": [full[0], half[0], full[1]]}, {"params": [half[1], full[2]]},
                  {"params": frozen, "lr": 0.0 if name != "LDoG" else 1.0}]  # DoG rejects lr = 0
        return full + half + frozen, FUSED[name](groups, backend=backend)

    require_backend(method(name), backend)
    ref_params, ref = build("torch")
    fused_params, fused = build(backend)
    for t in range(3):
        with torch.no_grad():
            for a, b in zip(fused_params, ref_params):
                a.copy_(b)
        for params, opt in ((ref_params, ref), (fused_params, fused)):
            opt.zero_grad()
            loss = sum(((p.float() - 0.1 * (i + t)) ** 2).sum() for i, p in enumerate(params))
            loss.backward()
            opt.step(loss=loss)
        for a, b in zip(fused_params, ref_params):
            tol = 1e-5 if a.dtype == torch.float32 else 2 ** -7
            assert rel_err(a.detach().float(), b.detach().float()) <= tol, (t, a.dtype, a.shape)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_zero_element_parameters(backend):
    require_backend(lrfree.PSDASGD, backend)  # the extension's availability; uncovered methods are skipped below
    empty = torch.zeros(0, 3, device=DEVICE, requires_grad=True)
    w = torch.ones(5, device=DEVICE, requires_grad=True)
    for name in ("PSDASGD", "Prodigy", "InexactPolyak", "LDoG"):
        if backend == "cuda" and method(name).kernels not in cuda_ext.COVERED_MODULES:
            continue
        only_empty = FUSED[name]([empty], backend=backend)
        empty.grad = torch.zeros_like(empty)
        only_empty.step(loss=torch.tensor(1.0, device=DEVICE))
        opt = FUSED[name]([empty, w], backend=backend)
        loss = (w * w).sum()
        loss.backward()
        opt.step(loss=loss.detach())
        assert torch.isfinite(w).all() and empty.numel() == 0
        w.grad = None


@pytest.mark.parametrize("name, backend", fused_cases(FUSED))
def test_checkpoints_move_between_backends(name, backend):
    """A state dict saved on one backend resumes on the other: the resumed run follows the uninterrupted
    one in fp64 (both directions)."""
    require_backend(method(name), backend)
    for first, second in (("torch", backend), (backend, "torch")):
        params, opt = make(name, torch.float64, first)
        for t in range(2):
            step(opt, params, t)
        moved_p, moved = make(name, torch.float64, second)
        sync(moved_p, params)
        moved.load_state_dict(opt.state_dict())
        for t in range(2, 4):
            step(opt, params, t)
            step(moved, moved_p, t)
        for k in params:
            assert rel_err(moved_p[k].detach(), params[k].detach()) <= 1e-12, (first, second, k)
        for k, v in opt.scalars().items():
            assert torch.allclose(moved.scalars()[k].cpu(), v.cpu(), rtol=1e-11, atol=0, equal_nan=True), k


@pytest.mark.parametrize("name, backend", fused_cases(["Adam", "AdamW", "ClippedSGD", "COCOB"]))
def test_a_rejected_step_leaves_the_step_scalars(name, backend):
    """A step rejected for a non-finite gradient or loss changes no scalar but the skip counter: the rule
    kernel commits Adam's per-tensor step counts and ClippedSGD's κ and ‖g‖ only if the step is taken."""
    require_backend(method(name), backend)
    params, opt = make(name, torch.float32, backend)
    for t in range(2):
        step(opt, params, t)
    for poison in ("gradient", "loss"):
        before = opt.scalars()
        opt.zero_grad()
        loss = loss_fn({k: v for k, v in params.items() if k != "wide"}, 9) + (params["wide"] ** 2).mean()
        loss.backward()
        if poison == "gradient":
            params["wide"].grad.view(-1)[2500] = math.inf
        opt.step(loss=loss if poison == "gradient" else loss.detach() * math.nan)
        after = opt.scalars()
        assert float(after["skipped"]) == float(before["skipped"]) + 1, poison
        for k, v in before.items():
            if k != "skipped":
                assert torch.equal(after[k], v), (poison, k)
    step(opt, params, 3)  # and the next finite step is taken
    assert float(opt.scalars()["steps"]) == 3.0


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_adam_bias_corrections_at_long_run_step_counts(backend):
    """A fused step forms β^t in its rule kernel as exp(t·log β) in fp64 (kernels/scalar_math.pow), the
    torch backend as pow(β, t): resumed at step counts of long runs (β2^t from 0.9999^10 to 0.9999^10⁶ ≈ 0)
    the fp64 backends agree to 1e-12, as they do over the first steps."""
    require_backend(lrfree.AdamW, backend)
    for t in (10, 1000, 30000, 10**6):
        runs = {}
        for b in ("torch", backend):
            g = torch.Generator().manual_seed(7)
            params = [torch.randn(n, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_() for n in (40, 7)]
            opt = lrfree.AdamW([{"params": params[:1]}, {"params": params[1:], "betas": (0.8, 0.9999)}], lr=1e-2,
                               backend=b)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(DEVICE)
            opt.step()
            saved = opt.state_dict()
            for entry in saved["state"].values():
                entry["step"] = torch.tensor(float(t - 1), dtype=torch.float64)
            opt.load_state_dict(saved)
            opt.step()
            runs[b] = params, opt.scalars()
        (ref_p, ref_s), (fused_p, fused_s) = runs["torch"], runs[backend]
        for a, b in zip(fused_p, ref_p):
            assert rel_err(a.detach(), b.detach()) <= 1e-12, t
        assert torch.equal(fused_s["step"].cpu(), ref_s["step"].cpu()) and float(fused_s["step"][0]) == t
