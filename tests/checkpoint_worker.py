"""The processes of tests/test_checkpoint_dcp.py: FSDP2 training checkpointed with
``torch.distributed.checkpoint`` (DCP) and resumed at another world size.

* ``save`` phase: every method trains ``BEFORE`` steps on an FSDP2 model (fp64, the layout and param groups
  of ``distributed_worker``), is saved with ``get_state_dict`` → ``dcp.save``, and trains ``AFTER`` more
  steps: the uninterrupted run.
* ``resume`` phase: a fresh model (other initial values) and a fresh optimizer at this world size load the
  checkpoint with ``get_state_dict`` → ``dcp.load`` → ``set_state_dict`` and train the same ``AFTER`` steps.

Each rank feeds its own rows of one batch, equal in number at 1, 2 and 4 ranks, so every world size
trains on the full-batch gradient and the resumed run must equal the uninterrupted one up to the order of
the fp64 additions.
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

import distributed_worker as W

BEFORE, AFTER = 2, 2
METHODS = tuple(W.SHARDED_COLLECTIVES)  # every class of optimizer_db


def _fsdp_model(world: int, seed: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5)).double()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(model, opt, needs_loss: bool, rank: int, world: int, steps: int) -> None:
    x, y = W._data()
    mine = slice(rank, None, world)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x[mine]) - y[mine]) ** 2).mean()
        loss.backward()
        if needs_loss:
            opt.step(loss=loss.detach())
        else:
            opt.step()


def _snapshot(model, opt) -> dict:
    """The whole parameters, scalars and per-parameter state (gathered from the shards)."""
    state = {}
    for pid, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            state[f"{pid}.{key}"] = (value.full_tensor() if hasattr(value, "full_tensor") else value).clone()
    return {"params": [p.full_tensor().detach().clone() for p in model.parameters()], "scalars": opt.scalars(),
            "state": state}


def run(phase: str, method: str, backend: str, rank: int, world: int, folder: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from optimizer_db import BY_NAME
    info = BY_NAME[method]
    path = os.path.join(folder, f"{method}-{backend}")
    model = _fsdp_model(world, seed=0 if phase == "save" else 7)
    opt = info.make(W._groups(model, method), backend=backend)
    if phase == "save":
        _train(model, opt, info.needs_loss, rank, world, BEFORE)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    else:
        model_sd, optim_sd = get_state_dict(model, opt)  # the fresh optimizer's layout, which DCP loads into
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    _train(model, opt, info.needs_loss, rank, world, AFTER)
    return _snapshot(model, opt)


def sliced_state_refusal(rank: int, world: int) -> str:
    """What ``state_dict()`` says under FSDP2 for Prodigy with ``slice_p > 1``, whose sampled state is
    specific to each rank's shard (no DTensor describes it)."""
    import lrfree
    model = _fsdp_model(world, seed=0)
    named = list(model.named_parameters())
    opt = lrfree.Prodigy([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], slice_p=11)
    _train(model, opt, False, rank, world, 1)
    try:
        opt.state_dict()
    except ValueError as error:
        return str(error)
    return "no error"


def main(rank: int, world: int, init_file: str, folder: str, phase: str, cases: list[tuple[str, str]]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for method, backend in cases:
            try:
                results[(method, backend)] = run(phase, method, backend, rank, world, folder)
            except Exception:  # recorded, so the test names the method and shows the traceback
                results[(method, backend)] = {"error": traceback.format_exc()}
            dist.barrier()
        if phase == "save" and world > 1:
            results["sliced_state_refusal"] = sliced_state_refusal(rank, world)
    finally:
        torch.save(results, os.path.join(folder, f"{phase}-{world}-rank{rank}.pt"))
        dist.destroy_process_group()
