"""The ``torch.optim.Optimizer`` contract, for every optimizer × dtype × device.

state_dict round trips (also across dtypes/devices), add_param_group, None gradients, closures,
lr schedulers, low-precision parameters with fp32 state, determinism and ``scalars()``.
"""

import copy
import importlib

import pytest
import torch

import lrfree
from awkward import GROUP0, loss_fn, make_params, param_groups
from optimizer_db import OPTIMIZERS

IDS = [info.name for info in OPTIMIZERS]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def train(opt, params, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(params, t)
        loss.backward()
        opt.step(loss=loss)


def clone_params(params):
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_state_dict_round_trip_resumes_bit_for_bit(info, device):
    params = make_params(torch.float32, device=device)
    opt = info.make(param_groups(params))
    train(opt, params, 4)
    saved_params, saved = clone_params(params), copy.deepcopy(opt.state_dict())
    train(opt, params, 4, start=4)

    resumed_params = saved_params
    resumed = info.make(param_groups(resumed_params))
    resumed.load_state_dict(saved)
    train(resumed, resumed_params, 4, start=4)
    for k in params:
        assert torch.equal(params[k], resumed_params[k]), k
    for k, v in opt.scalars().items():
        assert torch.equal(v, resumed.scalars()[k]), k


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_state_dict_moves_across_dtypes_and_devices(info):
    params = make_params(torch.float32)
    opt = info.make(param_groups(params))
    train(opt, params, 3)
    target = "cuda" if torch.cuda.is_available() else "cpu"
    moved_params = {k: v.detach().to(target, torch.bfloat16).requires_grad_() for k, v in params.items()}
    moved = info.make(param_groups(moved_params))
    moved.load_state_dict(opt.state_dict())
    for p, state in moved.state.items():
        for key, value in state.items():
            assert value.device == p.device
            assert value.dtype in (torch.float32, p.dtype), (key, value.dtype)  # fp32 state kept fp32
    for v in moved.scalars().values():
        assert v.dtype == torch.float64 and v.device.type == torch.device(target).type
    train(moved, moved_params, 2, start=3)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_mismatched_state_dict_is_rejected_and_changes_nothing(info):
    params = make_params(torch.float64)
    opt = info.make(param_groups(params))
    train(opt, params, 2)
    before = copy.deepcopy(opt.state_dict())
    other = lrfree.Adam if info.cls is not lrfree.Adam else lrfree.AdamW
    foreign = other(param_groups(make_params(torch.float64)))
    train(foreign, dict(zip(make_params().keys(), [p for g in foreign.param_groups for p in g["params"]])), 1)
    with pytest.raises(ValueError, match="saved by"):
        opt.load_state_dict(foreign.state_dict())
    broken = copy.deepcopy(before)
    name = next(iter(broken["param_groups"][0]["lrfree"]["scalars"]))
    broken["param_groups"][0]["lrfree"]["scalars"][name] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="wrong shape"):
        opt.load_state_dict(broken)
    if any(before["state"].values()):  # every parameter has an entry, {} when it has no state
        broken = copy.deepcopy(before)
        first = next(pid for pid, entry in broken["state"].items() if entry)
        key = next(iter(broken["state"][first]))
        broken["state"][first][key] = torch.zeros(1, 2, 3)
        with pytest.raises(ValueError, match="shape"):
            opt.load_state_dict(broken)
    truncated = copy.deepcopy(before)
    truncated["param_groups"] = truncated["param_groups"][:1]
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(truncated)
    nan_lr = copy.deepcopy(before)
    nan_lr["param_groups"][1]["lr"] = float("nan")
    with pytest.raises(ValueError, match=r"param_groups\[1\].*lr=nan"):
        opt.load_state_dict(nan_lr)
    newer = copy.deepcopy(before)
    newer["param_groups"][0]["lrfree"]["format"] += 1
    with pytest.raises(ValueError, match="saved by a newer lrfree"):
        opt.load_state_dict(newer)
    after = opt.state_dict()
    for g_before, g_after in zip(before["param_groups"], after["param_groups"]):
        scalars_before, scalars_after = g_before.pop("lrfree")["scalars"], g_after.pop("lrfree")["scalars"]
        assert scalars_before.keys() == scalars_after.keys()
        for k, v in scalars_before.items():
            assert torch.equal(v, scalars_after[k])
        assert g_before == g_after
    for pid, entry in before["state"].items():
        assert entry.keys() == after["state"][pid].keys()
        assert all(torch.equal(v, after["state"][pid][k]) for k, v in entry.items())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_none_gradients_are_skipped(info):
    params = make_params(torch.float64)
    opt = info.make(param_groups(params))
    unused_before = params["unused"].detach().clone()
    train(opt, params, 3)
    assert params["unused"].grad is None
    assert torch.equal(params["unused"], unused_before)
    assert not opt.state[params["unused"]]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_add_param_group_mid_training(info):
    params = make_params(torch.float64)
    opt = info.make([{"params": [params[k] for k in GROUP0]}])
    train(opt, params, 3)
    late = {k: v for k, v in params.items() if k not in GROUP0}
    before = {k: v.detach().clone() for k, v in late.items()}
    opt.add_param_group({"params": list(late.values())})
    train(opt, params, 3, start=3)
    assert any(not torch.equal(late[k], before[k]) for k in late), "the added group must be optimized"
    for value in opt.scalars().values():
        assert value.dim() == 0 or value.numel() in (len(opt.param_groups), len(params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_closure_is_evaluated_and_its_loss_returned(info):
    params = make_params(torch.float64)
    opt = info.make(param_groups(params))
    calls = []

    def closure():
        opt.zero_grad()
        loss = loss_fn(params, 0)
        loss.backward()
        calls.append(1)
        return loss

    returned = opt.step(closure)
    assert calls == [1] and torch.is_tensor(returned)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_lr_scheduler_composes(info):
    """The group's ``lr`` is read at every step, so a scheduler changes the trajectory from the step
    it acts on, and not before."""
    def run(schedule):
        params = make_params(torch.float64)
        opt = info.make(param_groups(params))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 if (schedule and step >= 3) else 1.0)
        history = []
        for t in range(6):
            opt.zero_grad()
            loss = loss_fn(params, t)
            loss.backward()
            opt.step(loss=loss)
            sched.step()
            history.append({k: v.detach().clone() for k, v in params.items()})
        return history

    plain, scheduled = run(False), run(True)
    for t in range(3):  # LambdaLR's factor for scheduler epoch 3 applies from the 4th step on
        assert all(torch.equal(plain[t][k], scheduled[t][k]) for k in plain[t]), t
    assert any(not torch.equal(plain[5][k], scheduled[5][k]) for k in plain[5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_low_precision_parameters_keep_fp32_state(info, dtype):
    params = make_params(dtype)
    start = {k: v.detach().clone() for k, v in params.items()}
    opt = info.make(param_groups(params))
    train(opt, params, 3)
    assert any(not torch.equal(params[k], start[k]) for k in params)
    for p, state in opt.state.items():
        assert p.dtype == dtype
        for key, value in state.items():
            assert value.dtype in (torch.float32, dtype), key
            assert torch.isfinite(value.float()).all(), key
    for v in opt.scalars().values():
        assert v.dtype == torch.float64


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_same_run_twice_is_bit_identical(info):
    runs = []
    for _ in range(2):
        params = make_params(torch.float32)
        opt = info.make(param_groups(params))
        train(opt, params, 5)
        runs.append((params, opt.scalars()))
    (pa, sa), (pb, sb) = runs
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert all(torch.equal(sa[k], sb[k]) or (sa[k].isnan() == sb[k].isnan()).all() for k in sa)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_scalars_are_device_tensors_and_copies(info):
    params = make_params(torch.float32)
    opt = info.make(param_groups(params))
    train(opt, params, 2)
    scalars = opt.scalars()
    assert {"steps", "skipped"} <= set(scalars)
    assert float(scalars["steps"]) == 2.0 and float(scalars["skipped"]) == 0.0
    for v in scalars.values():
        assert isinstance(v, torch.Tensor) and v.dtype == torch.float64
        v.fill_(123.0)
    assert float(opt.scalars()["steps"]) == 2.0
    assert info.name in repr(opt)


def test_backend_selection(monkeypatch):
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="backend='cuda' does not cover this method"):
        lrfree.DoG(p, backend="cuda")
    if not torch.cuda.is_available():
        monkeypatch.setenv("LRFREE_CUDA_HOST", "0")
        with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors and the parameters are on cpu"):
            lrfree.PSDASGD(p, backend="cuda")
    assert lrfree.PSDASGD(p, backend="auto").backend == ("triton" if torch.cuda.is_available() else "torch")
    assert lrfree.PSDASGD(p, backend="torch").backend == "torch"
    # Triton decides at decoration time whether a @jit function is interpreted: the kernels the construction
    # below imports (to see whether Triton works) must be imported under the interpreter first, or they stay
    # compiled-mode functions and every later interpreted launch fails (test_no_host_sync did, run after this)
    importlib.import_module("lrfree.kernels.multi_tensor")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors and the parameters are on cpu"):
        lrfree.PSDASGD(p, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert lrfree.PSDASGD(p, backend="triton").backend == "triton"
    assert "[backend=triton]" in repr(lrfree.PSDASGD(p, backend="triton"))


def test_public_api():
    expected = {"InexactPolyak", "PSSPS", "PSDASGD", "SPS", "DecSPS", "AdaSPS", "ClippedSGD", "DoG", "LDoG",
                "DAdaptSGD", "DAdaptAdam", "Prodigy", "COCOB", "Adam", "AdamW"}
    assert expected <= set(lrfree.__all__)
    assert {info.name for info in OPTIMIZERS} == expected
    for name in expected:
        assert issubclass(getattr(lrfree, name), torch.optim.Optimizer)
