"""(6) ``step()`` never reads a device value on the host.

Every host-sync entry point of ``torch.Tensor`` (``item``, ``bool``/``float``/``int``/``index``
conversions, ``tolist``, ``numpy``, ``cpu``) raises while ``step()`` runs, from the very first step
(lazy state creation included). On CUDA the same steps also run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

import pytest
import torch

from awkward import loss_fn, make_params, param_groups
from optimizer_db import OPTIMIZERS, require_backend

SYNC_ENTRY_POINTS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu",
                     "__array__")


class HostSync(AssertionError):
    pass


def forbid_syncs(monkeypatch):
    def make(name):
        def raising(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} called inside step()")
        return raising
    for name in SYNC_ENTRY_POINTS:
        monkeypatch.setattr(torch.Tensor, name, make(name))


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_step_reads_nothing_back(info, state_dtype, monkeypatch):
    params = make_params(torch.float32)
    opt = info.make(param_groups(params, {"weight_decay": 0.01}
                                 if "weight_decay" in info.cls.hyperparameters else None), state_dtype=state_dtype)
    losses = []
    for t in range(3):
        opt.zero_grad()
        loss = loss_fn(params, t)
        loss.backward()
        losses.append(loss.detach())
    with monkeypatch.context() as m:
        forbid_syncs(m)
        opt.step(loss=losses[-1])
        opt.step(loss=losses[-1])
        opt.scalars()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_closure_values_and_complex_parameters_read_nothing_back(info, monkeypatch):
    """The drop-in paths as well: a closure's (1,)-shaped loss (of any shape for a method that does not
    read the loss; its finiteness is reduced on the device) and a complex parameter (its real view)."""
    params = make_params(torch.float32)
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    opt = info.make(param_groups(params) + [{"params": [z]}])
    for t in range(2):
        opt.zero_grad()
        loss = loss_fn(params, t)
        loss.backward()
        z.grad = torch.randn_like(z)
        value = loss.detach().reshape(1) if info.needs_loss else loss.detach().expand(3)
        with monkeypatch.context() as m:
            forbid_syncs(m)
            assert opt.step(lambda: value) is value


def test_the_guard_catches_a_sync(monkeypatch):
    """The harness itself: a step that calls .item() is caught."""
    t = torch.ones(())
    with monkeypatch.context() as m:
        forbid_syncs(m)
        with pytest.raises(HostSync):
            t.item()
        with pytest.raises(HostSync):
            bool(t > 0)
        with pytest.raises(HostSync):
            max(t, torch.zeros(()))


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_fused_step_reads_nothing_back(info, state_dtype, monkeypatch):
    """The fused backend's orchestration (rules, coefficient vectors, reductions of partials) makes no
    host read either. Triton's CPU interpreter reads kernel arguments on the host by design, so the
    guard is lifted inside kernel launches only; on CUDA the sync-debug test below covers those too."""
    from lrfree.kernels import multi_tensor

    params = make_params(torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    opt = info.make(param_groups(params), backend="triton", state_dtype=state_dtype)
    for t in range(2):
        opt.zero_grad()
        loss = loss_fn(params, t)
        loss.backward()
        opt.step(loss=loss)  # lazy state and cached tables are built here
    opt.zero_grad()
    loss = loss_fn(params, 2)
    loss.backward()
    real_launch = multi_tensor.launch
    saved = {name: getattr(torch.Tensor, name) for name in SYNC_ENTRY_POINTS}

    def unguarded_launch(*args, **kwargs):
        guarded = {name: getattr(torch.Tensor, name) for name in SYNC_ENTRY_POINTS}
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        try:
            real_launch(*args, **kwargs)
        finally:
            for name, fn in guarded.items():
                setattr(torch.Tensor, name, fn)

    with monkeypatch.context() as m:
        for module in _kernel_modules():
            m.setattr(module, "launch", unguarded_launch)
        forbid_syncs(m)
        opt.step(loss=loss.detach())
        opt.scalars()


def _kernel_modules():
    import importlib
    names = ["multi_tensor", "common", "sgd", "dog", "clipped_sgd", "dadapt_sgd", "dadapt_adam", "prodigy",
             "cocob", "adam", "ps_dasgd", "ps_sps"]
    return [importlib.import_module(f"lrfree.kernels.{n}") for n in names]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_cuda_sync_debug_mode(info, backend, state_dtype):
    require_backend(info.cls, backend)
    params = make_params(torch.float32, device="cuda")
    opt = info.make(param_groups(params), backend=backend, state_dtype=state_dtype)
    for t in range(3):
        opt.zero_grad()
        loss = loss_fn(params, t)
        loss.backward()
        if t == 0:
            opt.step(loss=loss)  # lazy state creation happens here
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(loss=loss)
        finally:
            torch.cuda.set_sync_debug_mode("default")
