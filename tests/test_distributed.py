"""Data-parallel training (gloo on CPU, 2 and 4 processes; NCCL on two GPUs where present): FSDP2, ZeRO-style shards and DDP runs equal the
single-process run in fp64, each step issues exactly the expected collectives, and a non-finite gradient or
loss on one rank skips the step on every rank. The processes are in ``distributed_worker``."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lrfree
import distributed_worker as W

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLDS = (2, 4)
CASES = [(world, s) for s in W.scenarios() for world in WORLDS if world in s.worlds]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every scenario, run once per world size; {world: [rank results]}."""
    return {world: _spawn(world, tmp_path_factory.mktemp(f"world{world}"), [s.id for w, s in CASES if w == world])
            for world in WORLDS}


def _spawn(world: int, folder, ids: list[str], device_type: str = "cpu") -> list[dict]:
    mp.start_processes(W.main, args=(world, str(folder / "init"), str(folder), ids, device_type), nprocs=world,
                       join=True, start_method="spawn")
    return [torch.load(folder / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def nccl_runs(tmp_path_factory):
    """The world-2 scenarios again on two GPUs with NCCL (bench/gpu_check.sh runs them where it can)."""
    if torch.cuda.device_count() < 2 or not dist.is_nccl_available():
        pytest.skip("needs two CUDA devices and NCCL")
    return _spawn(2, tmp_path_factory.mktemp("nccl"), [s.id for s in NCCL_CASES], "cuda")


NCCL_CASES = [s for w, s in CASES if w == 2]


@pytest.mark.parametrize("world,scenario", CASES, ids=[f"{w}ranks-{s.id}" for w, s in CASES])
def test_data_parallel_step_equals_single_process(runs, world, scenario):
    check_ranks(runs[world], scenario)


@pytest.mark.parametrize("scenario", NCCL_CASES, ids=[f"2ranks-{s.id}" for s in NCCL_CASES])
def test_data_parallel_on_nccl_equals_single_process(nccl_runs, scenario):
    check_ranks(nccl_runs, scenario)


def check_ranks(ranks: list[dict], scenario) -> None:
    for rank, results in enumerate(ranks):
        r = results[scenario.id]
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
        # fp64: the shards' partial sums only change the order of the additions
        assert r["param_err"] <= 1e-12, f"rank {rank}: parameters differ by {r['param_err']:.3g}"
        assert r["scalar_err"] <= 1e-12, f"rank {rank}: step scalars differ by {r['scalar_err']:.3g}"
        counted = [c for step, c in enumerate(r["collectives"])
                   if not (scenario.layout == "ddp" and step == W.POISON_STEP)]  # ddp passes a loss there
        assert counted == [r["expected"]] * len(counted), f"rank {rank}: collectives per step {r['collectives']}"
        assert r["skipped_ok"], f"rank {rank}: a non-finite value on rank {W.POISON_RANK} did not skip the step here"


def test_every_method_has_an_expected_collective_count():
    from optimizer_db import OPTIMIZERS
    assert set(W.SHARDED_COLLECTIVES) == {info.name for info in OPTIMIZERS}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"process_group": "world"}, TypeError, "process_group must be a torch.distributed.ProcessGroup"),
    ({"sharded": True}, ValueError, "sharded=True needs the process_group"),
    ({"sharded": "yes"}, TypeError, "sharded must be True, False or None"),
])
def test_distributed_options_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        lrfree.DAdaptAdam([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_single_process_steps_issue_no_collective():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = lrfree.SPS([p])
    assert opt._layout is None
    p.grad = torch.ones_like(p)
    opt.step(loss=torch.tensor(1.0))
    assert p[0] < 1
