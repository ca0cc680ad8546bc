"""What only a GPU can show: ``step()`` captured in a CUDA graph replays exactly like eager steps, and
tensors of more than 2³¹ elements (64-bit offsets). Skipped without CUDA."""

import pytest
import torch

import lrfree
from awkward import loss_fn, make_params, param_groups
from optimizer_db import OPTIMIZERS, require_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _grads(params, t):
    for p in params.values():
        p.grad = None
    loss = loss_fn(params, t)
    loss.backward()
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return loss.detach()


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_cuda_graph_replay_equals_eager(info, backend):
    require_backend(info.cls, backend)
    eager_p, graph_p = make_params(torch.float32, device="cuda"), make_params(torch.float32, device="cuda")
    eager = info.make(param_groups(eager_p), backend=backend)
    graphed = info.make(param_groups(graph_p), backend=backend)
    assert graphed.backend == backend
    for t in range(2):  # warm-up: lazy state, tables and caches are built outside the graph
        for params, opt in ((eager_p, eager), (graph_p, graphed)):
            opt.step(loss=_grads(params, t))
    static_grads = {k: p.grad for k, p in graph_p.items()}
    static_loss = torch.zeros((), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph):
            graphed.step(loss=static_loss)
    torch.cuda.current_stream().wait_stream(stream)
    # capture ran nothing; replaying it is the step
    for t in range(2, 6):
        loss = _grads(eager_p, t)
        eager.step(loss=loss)
        fresh = make_params(torch.float32, device="cuda")
        with torch.no_grad():
            for k, p in fresh.items():
                p.copy_(graph_p[k])
        loss_g = _grads(fresh, t)
        for k, g in static_grads.items():
            g.copy_(fresh[k].grad)
        static_loss.copy_(loss_g)
        graph.replay()
    torch.cuda.synchronize()
    for k in eager_p:
        assert torch.equal(eager_p[k], graph_p[k]), k
    for k, v in eager.scalars().items():
        assert torch.equal(v, graphed.scalars()[k]) or (v.isnan() == graphed.scalars()[k].isnan()).all(), k


@pytest.mark.slow
def test_tensors_beyond_int32_offsets():
    n = 2 ** 31 + 1025
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * n + 2 ** 30:
        pytest.skip("needs about 9 GB of free GPU memory")
    x = torch.zeros(n, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    x.grad = torch.ones_like(x)
    opt = lrfree.InexactPolyak([x], T=4, backend="triton")
    opt.step(loss=torch.tensor(float(n), device="cuda"))  # η = f / (√T ‖g‖²) = 1/2
    tail = x[-3:].float()
    assert torch.equal(tail, torch.full_like(tail, -0.5)), tail
    assert float(x[2 ** 31 + 7]) == -0.5
