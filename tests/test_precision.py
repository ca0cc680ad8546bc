"""``state_dtype=torch.bfloat16`` (lrfree.precision): which state is stored in bf16, the stochastic-rounding
store (the kernels' ``to_state`` against the reference's bits), agreement between the backends, unbiased
EMA updates below bf16's resolution, checkpoints, skipped steps and bad input."""

import copy
import math

import pytest
import torch
import triton
import triton.language as tl

import lrfree
from lrfree import precision
from lrfree.backends import torch_ref as R
from lrfree.kernels.rounding import salt, to_state
from optimizer_db import BY_NAME, GLYDER_VARIANTS, OPTIMIZERS, require_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16 = torch.bfloat16
# the methods with per-element statistics (the others have nothing for state_dtype to store)
STATEFUL = [info for info in OPTIMIZERS if info.cls.low_precision_state]
VARIANTS = [(info, variant) for info in STATEFUL for variant in info.kernel_variants]
SHAPES = ((37, 5), (64,), (3,), (2048 + 17,))  # aligned and not, one longer than a block


def variant_id(case) -> str:
    info, variant = case
    return info.name + ("" if not variant else "[" + ",".join(f"{k}={v}" for k, v in variant.items()) + "]")


def make_params(dtype=torch.float32, shapes=SHAPES):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(s, generator=gen) * 0.5).to(DEVICE, dtype).requires_grad_() for s in shapes]


def run(opt, params, steps=range(3), nan_at=None):
    """Steps through one fixed sequence of gradients and losses (``steps`` indexes it)."""
    gen = torch.Generator().manual_seed(6)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(6)]
    for t in steps:
        for p, g in zip(params, grads[t]):
            p.grad = g.to(DEVICE, p.dtype)
        if t == nan_at:
            params[0].grad.view(-1)[0] = float("nan")
        opt.step(loss=torch.tensor(2.0 - 0.1 * t, device=DEVICE))
    return opt


def state_of(opt, params) -> dict[str, torch.Tensor]:
    """Every state tensor, by key, the parameters' concatenated."""
    keys = opt.state[params[0]].keys()
    return {k: torch.cat([opt.state[p][k].reshape(-1) for p in params]) for k in keys}


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 rounding steps apart the elements of two bf16 tensors of one sign are."""
    return (a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs()


# ------------------------------------------------------------------------------------------ what is stored
@pytest.mark.parametrize("case", VARIANTS, ids=variant_id)
def test_statistics_are_stored_in_bf16_and_anchors_keep_their_dtype(case):
    info, variant = case
    for dtype in (torch.float32, BF16, torch.float64):
        params = make_params(dtype)
        opt = run(info.make(params, state_dtype=BF16, **variant), params, range(1))
        default = info.make(make_params(dtype), **variant)
        run(default, default.param_groups[0]["params"], range(1))
        for key, value in opt.state[params[0]].items():
            reference = default.state[default.param_groups[0]["params"][0]][key].dtype
            compressed = key in info.cls.low_precision_state and dtype != torch.float64
            assert value.dtype == (BF16 if compressed else reference), (key, dtype)
        assert float(opt.scalars()["steps"]) == 1


# the README's methods table: state bytes per fp32 parameter element, default options, (fp32, bf16 state)
README_STATE_BYTES = {"InexactPolyak": (0, 0), "PSSPS": (4, 2), "PSDASGD": (12, 6), "SPS": (0, 0), "DecSPS": (0, 0),
                      "AdaSPS": (0, 0), "ClippedSGD": (0, 0), "DoG": (4, 4), "LDoG": (4, 4), "DAdaptSGD": (8, 6),
                      "DAdaptAdam": (12, 6), "Prodigy": (16, 10), "COCOB": (20, 12), "Adam": (8, 4), "AdamW": (8, 4)}


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda info: info.name)
def test_state_bytes_per_parameter_are_the_readmes(info):
    fp32, bf16 = README_STATE_BYTES[info.name]
    assert precision.state_bytes(info.cls, torch.float32, **info.kwargs) == fp32
    assert precision.state_bytes(info.cls, BF16, **info.kwargs) == bf16


# ------------------------------------------------------------------------------------------ the store
@triton.jit
def _store_kernel(values, out, seeds, n, SALT: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    value = tl.load(values + t * n + offs, mask=mask)
    tl.store(out + t * n + offs, to_state(value, tl.bfloat16, seeds, t, offs, SALT), mask=mask)


@pytest.mark.parametrize("key", ["exp_avg", "s", "reward"])
def test_the_kernels_state_store_draws_the_reference_bits(key):
    """``kernels.rounding.to_state`` stores exactly the bits the reference's ``commit_state`` stores: the
    tensor's step seed salted by the key, indexed by the element's position in the tensor."""
    gen = torch.Generator().manual_seed(1)
    n = 3000
    values = torch.randn(3, n, generator=gen) * torch.logspace(-20, 20, n)
    values[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    seeds = R.tensor_seed(R.step_seed(torch.tensor(7.0, dtype=torch.float64)), torch.tensor([0, 4, 9]))
    out = torch.empty(3, n, dtype=BF16, device=DEVICE)
    _store_kernel[(3, triton.cdiv(n, 1024))](values.to(DEVICE), out, seeds.to(DEVICE), n, SALT=salt(key), BLOCK=1024)
    index = torch.arange(n)  # each row is a tensor: its elements' positions in it
    expected = R.stochastic_round_bf16(values, R.mix32(seeds ^ precision.salt(key)).unsqueeze(1), index)
    out = out.cpu()
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))
    # and not the parameters' bits (nor, by its salt, another key's)
    assert not torch.equal(expected[finite], R.stochastic_round_bf16(values, seeds.unsqueeze(1), index)[finite])


@pytest.mark.parametrize("case", VARIANTS, ids=variant_id)
def test_fused_backends_store_the_references_state(case):
    """Backends round with the same bits, so their bf16 state agrees element for element. Where the two
    fp32 values being rounded differ in their last bits (the reference forms m with torch.lerp, Adam's
    kernel as β1 m + (1−β1) g; reductions run in another order), a dither can fall between them: such an
    element is one bf16 step off, which happens to a fraction 2⁻¹⁶ of the differing values per step."""
    info, variant = case
    for backend in ("triton", "cuda"):
        require_backend(info.cls, backend)
        runs = []
        for name in ("torch", backend):
            params = make_params()
            runs.append((params, run(info.make(params, backend=name, state_dtype=BF16, **variant), params)))
        (ref_params, ref), (params, opt) = runs
        expected, actual = state_of(ref, ref_params), state_of(opt, params)
        for key in info.cls.low_precision_state:
            if key in expected:
                ulps = bf16_ulps(actual[key], expected[key])
                assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= 2, (key, int((ulps > 0).sum()))
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", VARIANTS, ids=variant_id)
def test_fused_backends_round_bf16_parameters_and_state_as_the_reference(case):
    """bf16 parameters under stochastic_rounding next to bf16 state, each stored with its own bits: the
    fused backends agree with the reference as above, parameters included (where a state element is a step
    off, the parameter it moves may round a step off too)."""
    info, variant = case
    for backend in ("triton", "cuda"):
        require_backend(info.cls, backend)
        runs = []
        for name in ("torch", backend):
            params = make_params(BF16)
            opt = info.make(params, backend=name, state_dtype=BF16, stochastic_rounding=True, **variant)
            runs.append((params, run(opt, params)))
        (ref_params, ref), (params, opt) = runs
        expected, actual = state_of(ref, ref_params), state_of(opt, params)
        expected["params"] = torch.cat([p.detach().reshape(-1) for p in ref_params])
        actual["params"] = torch.cat([p.detach().reshape(-1) for p in params])
        for key in ("params", *info.cls.low_precision_state):
            if key in expected:
                ulps = bf16_ulps(actual[key], expected[key])
                assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= 2, (key, int((ulps > 0).sum()))


@pytest.mark.parametrize("variant", GLYDER_VARIANTS, ids=lambda v: f"{v['base'].__name__}-{v['curvature']}")
@pytest.mark.parametrize("guard", [True, False])
def test_glyder_stores_its_adam_directions_moments_as_the_base_does(variant, guard):
    options = {k: v for k, v in variant.items() if k not in ("base", "base_kwargs")}
    runs = []
    for backend in ("torch", "triton"):
        params = make_params()
        gen = torch.Generator().manual_seed(3)
        base = variant["base"](params, **variant["base_kwargs"], backend=backend, state_dtype=BF16,
                               skip_nonfinite=guard)
        opt = lrfree.GLyDER(base, skip_nonfinite=guard, **options)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            if opt.curvature == "gnb":
                opt.set_gnb_gradient([torch.randn(p.shape, generator=gen).to(DEVICE) for p in params], 8)
            if opt.gradient == "split":
                opt._probe = opt._buffers("split_backward", [torch.randn(p.shape, generator=gen).to(DEVICE)
                                                             for p in params])
            opt.step()
        runs.append((params, opt))
    (ref_params, ref), (params, opt) = runs
    expected, actual = state_of(ref, ref_params), state_of(opt, params)
    assert set(actual) == set(expected) and all(v.dtype == BF16 for v in actual.values())
    for key in actual:
        ulps = bf16_ulps(actual[key], expected[key])
        assert int(ulps.max()) <= 1 and int((ulps > 0).sum()) <= 2, key
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ema_updates_below_bf16_resolution_are_kept_on_average(backend):
    """v ← β2 v + (1 − β2) g² with a constant g = 1 and β2 = 0.99: once (1 − β2)(1 − v) falls below half of
    v's bf16 step (2^-9 for v in [0.5, 1), so at v > 0.80), round to nearest never moves v again and ends
    0.15 below the fp32 run; stochastic rounding keeps Adam's v on the fp32 run's path on average."""
    finals = {}
    for dtype in (torch.float32, BF16):
        p = torch.zeros(4096, device=DEVICE, requires_grad=True)
        opt = lrfree.Adam([p], lr=0.0, betas=(0.9, 0.99), state_dtype=dtype, backend=backend)
        for _ in range(300):
            p.grad = torch.ones_like(p)
            opt.step()
        finals[dtype] = opt.state[p]["exp_avg_sq"].float()
    fp32 = float(finals[torch.float32].mean())
    assert abs(fp32 - (1 - 0.99 ** 300)) < 1e-3  # the fp32 EMA itself drifts by 5e-4 from the closed form
    # each element's v is a random walk around the fp32 one: rounding errors of variance <= ulp²/4 (ulp =
    # 2^-8 here), kept by the EMA with weight β2² per step, add up to a stationary sd of at most
    # (ulp / 2) / sqrt(1 − β2²) = 0.014; the mean over 4096 elements is within 1e-3 (4 of its sds)
    assert abs(float(finals[BF16].mean()) - fp32) < 1e-3
    assert float(finals[BF16].std()) < 0.015


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["PSDASGD", "Prodigy", "AdamW"])
def test_bf16_state_resumes_bit_for_bit_and_skips_cleanly(name):
    """The state dict keeps bf16 state as it is and the rounding counter with the scalars: a resumed run
    draws the bits the uninterrupted one drew. A skipped step leaves every state tensor bit-identical."""
    info = BY_NAME[name]
    whole = make_params()
    whole_opt = run(info.make(whole, state_dtype=BF16), whole, range(4))
    first = make_params()
    first_opt = run(info.make(first, state_dtype=BF16), first, range(2))
    saved = copy.deepcopy(first_opt.state_dict())
    assert all(v.dtype == BF16 for k, v in saved["state"][0].items() if k in info.cls.low_precision_state)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    resumed_opt = info.make(resumed, state_dtype=BF16)
    resumed_opt.load_state_dict(saved)
    run(resumed_opt, resumed, range(2, 4))
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)
    for key, value in state_of(whole_opt, whole).items():
        assert torch.equal(value, state_of(resumed_opt, resumed)[key]), key
    before = {k: v.clone() for k, v in state_of(whole_opt, whole).items()}
    params_before = [p.detach().clone() for p in whole]
    run(whole_opt, whole, [4], nan_at=4)
    assert float(whole_opt.scalars()["skipped"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(params_before, whole))
    assert all(torch.equal(before[k], v) for k, v in state_of(whole_opt, whole).items())


def test_checkpoints_convert_between_state_dtypes():
    """An fp32-state checkpoint loads into a bf16-state optimizer (rounded to nearest once) and back."""
    params = make_params()
    fp32 = run(lrfree.PSDASGD(params, state_dtype=None), params, range(2))
    compact = lrfree.PSDASGD([p.detach().clone().requires_grad_() for p in params], state_dtype=BF16)
    compact.load_state_dict(fp32.state_dict())
    p0 = compact.param_groups[0]["params"][0]
    assert compact.state[p0]["s"].dtype == BF16
    assert torch.equal(compact.state[p0]["s"], fp32.state[params[0]]["s"].to(BF16))
    back = lrfree.PSDASGD([p.detach().clone().requires_grad_() for p in params])
    back.load_state_dict(compact.state_dict())
    assert back.state[back.param_groups[0]["params"][0]]["s"].dtype == torch.float32


def test_bf16_state_combines_with_master_weights_and_stochastic_rounding():
    for options in ({"master_weights": True}, {"stochastic_rounding": True}):
        params = make_params(BF16)
        opt = run(lrfree.PSDASGD(params, state_dtype=BF16, **options), params, range(3))
        state = opt.state[params[0]]
        assert state["s"].dtype == BF16 and state["exp_avg_sq"].dtype == BF16
        if "master" in state:
            assert state["master"].dtype == torch.float32
        assert float(opt.scalars()["steps"]) == 3 and all(torch.isfinite(p).all() for p in params)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("value", [torch.float16, torch.float64, "bf16", torch.int8])
def test_other_state_dtypes_are_refused_by_name(value):
    with pytest.raises(ValueError, match=r"DAdaptAdam: state_dtype=.* is not supported; use torch\.float32"):
        lrfree.DAdaptAdam([torch.nn.Parameter(torch.zeros(3))], state_dtype=value)


def test_methods_without_statistics_accept_state_dtype_and_store_nothing():
    params = make_params()
    opt = run(lrfree.SPS(params, state_dtype=BF16), params, range(2))
    assert not opt.state and "rounding_step" not in opt.scalars()
    assert math.isfinite(float(opt.scalars()["step_size"]))
