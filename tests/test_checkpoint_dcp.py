"""Checkpoints through ``torch.distributed.checkpoint`` (DCP) and its ``get_state_dict`` / ``set_state_dict``.

* FSDP2 (gloo, spawned processes in ``checkpoint_worker``): a run saved at 2 ranks and resumed at 1, 2 and
  4 ranks equals the uninterrupted run in fp64, for every method: the step scalars travel inside
  ``state`` / ``param_groups`` (the only parts DCP keeps) and the per-parameter state as DTensors (a plain
  tensor would be saved from one rank and loaded on all).
* The state-initializing step DCP runs on a fresh optimizer (zero gradients, lr = 0, no loss) raises for
  no method and changes nothing but the lazily created state.
* A state dict of format 1 (a top-level "lrfree" entry, ``data/state_dict_format1.pt``, saved by the
  lrfree of commit f897154) still loads and resumes exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint_worker as CW
import distributed_worker as W
from optimizer_db import BY_NAME, OPTIMIZERS

IDS = [info.name for info in OPTIMIZERS]
# every method on the reference backend; the fused passes once (Triton interpreted on CPU)
CASES = [(m, "torch") for m in CW.METHODS] + [("DAdaptAdam", "triton")]
RESUME_WORLDS = (1, 2, 4)


def _spawn(world: int, folder: Path, phase: str) -> list[dict]:
    init = folder / f"init-{phase}-{world}"
    mp.start_processes(CW.main, args=(world, str(init), str(folder), phase, CASES), nprocs=world, join=True,
                       start_method="spawn")
    return [torch.load(folder / f"{phase}-{world}-rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def dcp_runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    folder = tmp_path_factory.mktemp("dcp")
    saved = _spawn(2, folder, "save")
    return saved, {world: _spawn(world, folder, "resume") for world in RESUME_WORLDS}


def _errors(result: dict, what: str) -> None:
    assert "error" not in result, f"{what}:\n{result['error']}"


@pytest.mark.parametrize("world", RESUME_WORLDS)
@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_fsdp2_dcp_checkpoint_resumes_at_any_world_size(dcp_runs, case, world):
    saved, resumed = dcp_runs
    for rank, results in enumerate(saved):
        _errors(results[case], f"saving at 2 ranks, rank {rank}")
    expected = saved[0][case]
    for rank, results in enumerate(resumed[world]):
        got = results[case]
        _errors(got, f"resuming at {world} ranks, rank {rank}")
        # fp64: another world size only changes the order of the shards' additions
        for i, (a, b) in enumerate(zip(got["params"], expected["params"])):
            err = W._rel_err(a, b)
            assert err <= 1e-12, f"rank {rank}: parameter {i} differs from the uninterrupted run by {err:.3g}"
        assert got["scalars"].keys() == expected["scalars"].keys()
        for name, value in got["scalars"].items():
            err = W._rel_err(value, expected["scalars"][name])
            assert err <= 1e-12, (f"rank {rank}: scalar {name!r} is {value.tolist()}, in the uninterrupted run "
                                  f"{expected['scalars'][name].tolist()}")
        assert got["state"].keys() == expected["state"].keys()
        for name, value in got["state"].items():
            err = W._rel_err(value, expected["state"][name])
            assert err <= 1e-12, f"rank {rank}: state {name!r} differs from the uninterrupted run by {err:.3g}"


def test_fsdp2_state_without_a_sharded_layout_is_refused(dcp_runs):
    """Prodigy's slice_p > 1 state samples each rank's shard: no DTensor describes it, so saving it would
    reload wrongly at any other layout; state_dict() names the parameter instead."""
    saved, _ = dcp_runs
    for rank, results in enumerate(saved):
        message = results["sliced_state_refusal"]
        assert "'0.weight'" in message and "slice_p" in message, f"rank {rank}: {message}"


# ------------------------------------------------------------------ the state-initializing step
def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()


def _groups(model) -> list[dict]:
    return [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias]}]


def _train(model, opt, needs_loss: bool, steps: int, x, y) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if needs_loss:
            opt.step(loss=loss)
        else:
            opt.step()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_dcp_state_init_step_changes_nothing(info):
    """``get_state_dict`` on a fresh optimizer steps it with zero gradients and lr = 0 and no loss: the
    state exists afterwards, and the run that follows is bit for bit the run without that step."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model, twin = _model(), _model()
    opt, twin_opt = info.make(_groups(model)), info.make(_groups(twin))
    before = [p.detach().clone() for p in model.parameters()]
    _, optim_sd = get_state_dict(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in twin_opt.param_groups]
    fresh = twin_opt.scalars()
    for name, value in opt.scalars().items():
        assert torch.equal(value, fresh[name]), name
    for group in opt.param_groups:
        for p in group["params"]:
            expected = opt._new_state(p, group)
            assert opt.state.get(p, {}).keys() == expected.keys()
            for key, value in opt.state.get(p, {}).items():
                assert torch.equal(value, expected[key]), key
    assert set(optim_sd["state"]) == {name for name, _ in model.named_parameters()}
    _train(model, opt, info.needs_loss, 3, x, y)
    _train(twin, twin_opt, info.needs_loss, 3, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    twin_scalars = twin_opt.scalars()
    for name, value in opt.scalars().items():
        assert torch.equal(value, twin_scalars[name]), name


def test_a_real_step_with_lr_zero_still_counts():
    """Only the call DCP makes is a state-initializing step: once state exists, an lr = 0 step is a step."""
    model = _model()
    opt = BY_NAME["Adam"].make(_groups(model))
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    _train(model, opt, False, 1, x, y)
    for g in opt.param_groups:
        g["lr"] = 0.0
    _train(model, opt, False, 1, x, y)
    assert opt.scalars()["steps"] == 2


# ------------------------------------------------------------------ format 1
FORMAT1 = Path(__file__).parent / "data" / "state_dict_format1.pt"


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_format1_state_dict_still_loads(info):
    """A checkpoint saved with the top-level "lrfree" entry resumes to the step its saver took next."""
    saved = torch.load(FORMAT1)[info.name]
    assert saved["optimizer"]["lrfree"]["format"] == 1
    model = _model(seed=3)
    model.load_state_dict(saved["model"])
    opt = info.make(_groups(model))
    opt.load_state_dict(copy.deepcopy(saved["optimizer"]))
    _train(model, opt, info.needs_loss, 1, saved["x"], saved["y"])
    for p, q in zip(model.parameters(), saved["next_params"]):
        assert torch.equal(p.detach(), q)
    scalars = opt.scalars()
    assert scalars.keys() == saved["next_scalars"].keys()
    for name, value in saved["next_scalars"].items():
        assert torch.equal(scalars[name], value), name
    resaved = opt.state_dict()  # and it is saved again in format 2
    assert "lrfree" not in resaved and resaved["param_groups"][0]["lrfree"]["format"] == 2
