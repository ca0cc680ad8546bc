"""The processes of tests/test_distributed.py: each rank trains under a data-parallel layout beside an
unsharded single-process twin (full batch, same initialization) and records how far apart they are and how
many collectives each ``step()`` issued.

Layouts (see lrfree.distributed):
* ``fsdp``: FSDP2 ``fully_shard`` (DTensor ``Shard(0)`` parameters; uneven and empty shards at 4 ranks);
* ``zero``: ZeRO-style plain tensors, every rank a flat slice of every parameter (``sharded=True``);
* ``ddp``: DistributedDataParallel, replicated parameters; each rank's loss is its own micro-batch's.

At step ``POISON_STEP`` one rank alone gets a non-finite gradient (fsdp, zero) or loss (ddp): every rank
must skip, and the runs must still agree afterwards.
"""

from __future__ import annotations

import datetime
import os
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

STEPS = 5
POISON_STEP = 2
POISON_RANK = 1
N_ROWS = 8  # batch rows: an equal micro-batch per rank at 2 and 4 ranks, so the mean of means is the mean

# collectives a sharded step must issue, per method (one SUM per sync point; PS-DA-SGD adds one MAX)
SHARDED_COLLECTIVES = {"InexactPolyak": 1, "PSSPS": 1, "SPS": 1, "DecSPS": 1, "AdaSPS": 1, "ClippedSGD": 1,
                       "DoG": 1, "LDoG": 1, "COCOB": 1, "Adam": 1, "AdamW": 1,
                       "DAdaptSGD": 2, "DAdaptAdam": 2, "Prodigy": 2, "PSDASGD": 3}


@dataclass(frozen=True)
class Scenario:
    layout: str
    method: str
    backend: str = "torch"
    worlds: tuple[int, ...] = (2, 4)

    @property
    def id(self) -> str:
        return f"{self.layout}-{self.method}-{self.backend}"


def scenarios() -> list[Scenario]:
    out = [Scenario(layout, method) for layout in ("fsdp", "zero") for method in SHARDED_COLLECTIVES]
    out += [Scenario("ddp", method) for method in ("InexactPolyak", "PSSPS", "DAdaptAdam", "PSDASGD")]
    # the fused passes consume the same global statistics (Triton interpreted on CPU: two ranks only)
    out += [Scenario("fsdp", method, "triton", (2,)) for method in ("PSDASGD", "DoG", "SPS")]
    return out


def expected_collectives(s: Scenario, needs_loss: bool) -> int:
    if s.layout == "ddp":  # replicated: only the loss is averaged
        return 1 if needs_loss else 0
    return SHARDED_COLLECTIVES[s.method]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5)).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(N_ROWS, 6, generator=gen, dtype=torch.float64),
            torch.randn(N_ROWS, 5, generator=gen, dtype=torch.float64))


# per-group options of the second group: an lr ratio of the shared step (the D-Adaptation family's
# reparametrized statistics must be global sums too) and the per-group hyperparameters of issue 16
# (PS-DA-SGD's per-group averaging runs with the gradient EMA off, in both groups: betas are shared)
GROUP1 = {"DAdaptSGD": {"lr": 0.5}, "DAdaptAdam": {"lr": 0.5}, "Prodigy": {"lr": 0.5},
          "PSDASGD": {"lr": 0.5, "momentum": 0.5, "amsgrad": True, "betas": (0.0, 0.999)},
          "COCOB": {"lr": 0.5, "alpha": 20.0}, "ClippedSGD": {"max_norm": 0.3}}
GROUP0 = {"PSDASGD": {"betas": (0.0, 0.999)}}


def _groups(model, method: str = "") -> list[dict]:
    return [{"params": [model[0].weight, model[2].weight], **GROUP0.get(method, {})},
            {"params": [model[0].bias, model[2].bias], **GROUP1.get(method, {})}]


def _collectives_during(fn) -> int:
    """c10d collectives issued while ``fn`` runs (every kind: all_reduce, broadcast, all_gather, ...)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("c10d::"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    err = torch.where(a == b, torch.zeros_like(a), (a - b).abs() / (1 + b.abs()))
    return float(err.max()) if err.numel() else 0.0


def run(s: Scenario, rank: int, world: int, device: torch.device) -> dict:
    from optimizer_db import BY_NAME
    info = BY_NAME[s.method]
    x, y = (t.to(device) for t in _data())
    mine = slice(rank, None, world)
    ref = _model().to(device)
    model = _model().to(device)
    if s.layout == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = info.make(_groups(model, s.method), backend=s.backend)
        forward = model
    elif s.layout == "ddp":
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = info.make(_groups(model, s.method), backend=s.backend, process_group=dist.group.WORLD)
    else:  # zero: plain leaf tensors, this rank's flat slice of each parameter
        shards = {}
        for name, q in ref.named_parameters():
            shards[name] = q.detach().reshape(-1).tensor_split(world)[rank].clone().requires_grad_()
        by_ref = {id(q): shards[name] for name, q in ref.named_parameters()}
        groups = [{**g, "params": [by_ref[id(q)] for q in g["params"]]} for g in _groups(ref, s.method)]
        opt = info.make(groups, backend=s.backend, process_group=dist.group.WORLD, sharded=True)
    ref_opt = info.make(_groups(ref, s.method), backend=s.backend)

    def shard_of(q: torch.Tensor) -> torch.Tensor:
        return q.detach().reshape(-1).tensor_split(world)[rank]

    def current() -> list[torch.Tensor]:
        if s.layout == "zero":
            return [shards[name].detach().clone() for name, _ in ref.named_parameters()]
        return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]

    def expected() -> list[torch.Tensor]:
        if s.layout == "zero":
            return [shard_of(q).clone() for q in ref.parameters()]
        return [q.detach().clone() for q in ref.parameters()]

    param_err = scalar_err = 0.0
    counts, skipped_ok = [], True
    for step in range(STEPS):
        poison = step == POISON_STEP and rank == POISON_RANK
        ref_opt.zero_grad()
        ref_loss = ((ref(x) - y) ** 2).mean()
        ref_loss.backward()
        if s.layout == "zero":
            for name, q in ref.named_parameters():
                shards[name].grad = shard_of(q.grad).clone()
            loss = ref_loss.detach().clone()
            if poison:
                shards["0.weight"].grad.view(-1)[0] = float("nan")
        else:
            opt.zero_grad()
            loss = ((forward(x[mine]) - y[mine]) ** 2).mean()
            loss.backward()
            loss = loss.detach()
            if poison and s.layout == "fsdp":
                local = model[0].weight.grad.to_local()
                local.view(-1)[0] = float("nan")
            elif poison:  # ddp: gradients were averaged already; a rank's own loss is what can go bad
                loss = loss * float("nan")
        before = current()
        give_loss = info.needs_loss or (s.layout == "ddp" and step == POISON_STEP)
        counts.append(_collectives_during(lambda: opt.step(loss=loss) if give_loss else opt.step()))
        if step == POISON_STEP:  # nobody steps: the twin skips too
            after = current()
            skipped_ok &= all(torch.equal(a, b) for a, b in zip(before, after))
            skipped_ok &= float(opt.scalars()["skipped"]) == 1.0
            continue
        if info.needs_loss:
            ref_opt.step(loss=ref_loss)
        else:
            ref_opt.step()
        param_err = max(param_err, *(_rel_err(a, b) for a, b in zip(current(), expected())))
        ref_scalars = ref_opt.scalars()
        for name, value in opt.scalars().items():
            if name != "skipped":
                scalar_err = max(scalar_err, _rel_err(value, ref_scalars[name]))
    return {"param_err": param_err, "scalar_err": scalar_err, "collectives": counts,
            "expected": expected_collectives(s, info.needs_loss), "skipped_ok": skipped_ok}


def main(rank: int, world: int, init_file: str, out_dir: str, ids: list[str], device_type: str = "cpu") -> None:
    """One rank: gloo on CPU tensors, or NCCL with rank r on GPU r (``device_type="cuda"``)."""
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for s in scenarios():
            if s.id not in ids:
                continue
            try:
                results[s.id] = run(s, rank, world, device)
            except Exception:  # recorded, so the test names the scenario and shows the traceback
                results[s.id] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
