"""The torch backend's chunked passes (``lrfree.backends.torch_ref``): a step's tensors packed into
(rows, 64) matrices, per-tensor reductions as sums of row sums, state kept in the matrices, commits on
bit patterns. Each helper against the per-tensor computation it replaces."""

import copy
import math

import pytest
import torch

import lrfree
from lrfree.backends import torch_ref as R
from lrfree.optimizer import StepBatch, StepInputs
from awkward import loss_fn, make_params, param_groups

# awkward sizes: empty, 1 element, below / at / above a row, several rows, a tensor that is a chunk alone
# (R.ALONE), one that is packed but not contiguous, and a second group with a mixed dtype
SHAPES = [(0, 3), (1,), (63,), (64,), (65,), (7, 19), (130, 3)]


def make_batch(alone: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    group0 = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    if alone:
        group0.insert(3, torch.randn(R.ALONE + 5, generator=g).requires_grad_())
    strided = torch.randn(9, 11, generator=g).t().requires_grad_()  # packed, not contiguous
    group0.append(strided)
    group1 = [torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_(),
              torch.randn(33, generator=g).requires_grad_()]
    for p in group0 + group1:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    opt = lrfree.SPS([{"params": group0}, {"params": group1}], backend="torch")
    items = opt._gather()
    opt._sync_store()
    ok = torch.tensor(True)
    return StepBatch(items, StepInputs(None, ok), opt.device, opt), opt


def test_chunks_cover_every_tensor_once_and_per_item_restores_item_order():
    batch, _ = make_batch()
    chunks = R.chunks(batch)
    positions = sorted(i for c in chunks for i in c.positions)
    assert positions == list(range(len(batch.items)))
    assert any(not c.layout.packed for c in chunks)  # the large tensor is a chunk of its own...
    assert batch.__dict__["_chunk_order"] is not None  # ...so chunks list the items out of order
    for c in chunks:
        assert len({it.group_index for it in c.items}) == 1 and len({it.p.dtype for it in c.items}) == 1
    # per_item puts each chunk's values back at its items' positions
    expected = torch.tensor([float(i) for i in range(len(batch.items))], dtype=torch.float64)
    got = R.per_item(batch, lambda c: expected.index_select(0, c.index))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("reduction", ["sum", "dot", "sumsq", "l1", "amax"])
def test_per_tensor_reductions_match_one_reduction_per_tensor(reduction):
    """Σ over each tensor's own elements, in fp64: the padding after a tensor's last element never counts,
    even where the formula made NaN of it (0/0 there)."""
    batch, _ = make_batch()
    per_tensor = {"sum": lambda a, b: (a / a).to(torch.float64).sum() + a.to(torch.float64).sum(),
                  "dot": lambda a, b: R.dot(a / a, b) + R.dot(a, b), "sumsq": lambda a, b: R.sumsq(a / a) + R.sumsq(a),
                  "l1": lambda a, b: R.l1(a),
                  "amax": lambda a, b: torch.cat([(-a.abs() - 1).reshape(-1), a.new_full((1,), -math.inf)]).max(),
                  }[reduction]
    chunked = {"sum": lambda c, a, b: c.sum(a / a) + c.sum(a), "dot": lambda c, a, b: c.dot(a / a, b) + c.dot(a, b),
               "sumsq": lambda c, a, b: c.sumsq(a / a) + c.sumsq(a), "l1": lambda c, a, b: c.l1(a),
               "amax": lambda c, a, b: c.amax(-a.abs() - 1).to(torch.float64)}[reduction]  # padding: -1, above all
    got = R.per_item(batch, lambda c: chunked(c, c.grads, c.params))
    expected = torch.stack([per_tensor(R.up(it.g, it.p), R.up(it.p, it.p)).to(torch.float64) for it in batch.items])
    empty = torch.tensor([it.p.numel() == 0 for it in batch.items])
    assert got[~empty].isfinite().all()  # nothing from the padding (0/0 there), no -inf
    if reduction == "amax":
        assert torch.equal(got, expected) and (got[empty] == -math.inf).all()
        return
    fp64 = torch.tensor([it.p.dtype == torch.float64 for it in batch.items])
    assert torch.equal(got[fp64], expected[fp64])  # fp64 parameters: the reference's own ops, bit for bit
    assert torch.allclose(got, expected, rtol=1e-14, atol=0)


def test_sliced_chunks_take_every_step_th_element_of_each_tensor():
    batch, _ = make_batch()
    for c in R.chunks(batch):
        sliced = c.every(3)
        taken = sliced.unpacked(sliced.take(c.grads))
        for it, t in zip(c.items, taken):
            assert torch.equal(t, R.up(it.g, it.p).reshape(-1)[::3])
        assert c.every(1) is c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_select_keeps_or_replaces_every_bit(dtype):
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1.5, -2.25e-3], dtype=torch.float32)
    old = torch.cat([specials, torch.randn(50)]).to(dtype)
    new = torch.cat([specials.flip(0), torch.randn(50)]).to(dtype)
    bits = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    for ok in (True, False):
        dst = old.clone()
        R.select_(dst, new, torch.tensor(ok))
        assert torch.equal(dst.view(bits), (new if ok else old).view(bits))


def test_packed_stochastic_rounding_draws_each_tensors_own_bits():
    """A chunk rounds every tensor as the per-tensor reference does: the bits of its own seed, indexed by
    the element's position in the tensor."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=g).to(torch.bfloat16).requires_grad_() for s in SHAPES[1:]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
    opt = lrfree.SPS(params, backend="torch", stochastic_rounding=True)
    items = opt._gather()
    opt._sync_store()
    batch = StepBatch(items, StepInputs(None, torch.tensor(True)), opt.device, opt,
                      sr_base=R.step_seed(torch.tensor(7.0, dtype=torch.float64)))
    values = [torch.randn(it.p.shape, generator=g) for it in items]
    expected = [R.stochastic_round_bf16(v, R.tensor_seed(batch.sr_base, torch.tensor(it.flat_index)))
                for it, v in zip(items, values)]
    with torch.no_grad():
        for c in R.chunks(batch):
            c.commit_params(c.load("values", [values[i] for i in c.positions]), batch.ok)
    for it, e in zip(items, expected):
        assert torch.equal(it.p, e)


def adam_run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        opt.zero_grad()
        loss_fn(params, t).backward()
        opt.step()


def test_state_lives_in_the_chunk_and_state_loaded_from_outside_is_taken_in():
    """After a step the packed state tensors of one key are views of one matrix; a state dict loaded into a
    fresh optimizer (new tensors) is taken in at its next step and continues the same trajectory, and a
    state tensor replaced by hand is read from its new value."""
    params = make_params(torch.float32)
    opt = lrfree.AdamW(param_groups(params), lr=1e-2, weight_decay=0.1, backend="torch")
    adam_run(opt, params, 3)
    for group in opt.param_groups:  # one matrix per param group (the awkward model's fit in one chunk each)
        m = [opt.state[p]["exp_avg"] for p in group["params"] if p in opt.state]
        assert len({t.untyped_storage().data_ptr() for t in m}) == 1
    saved = copy.deepcopy(opt.state_dict())  # the state dict holds the live tensors, as torch's does
    saved_params = {k: v.detach().clone() for k, v in params.items()}

    adam_run(opt, params, 2, start=3)
    resumed_params = {k: v.detach().clone().requires_grad_() for k, v in saved_params.items()}
    resumed = lrfree.AdamW(param_groups(resumed_params), lr=1e-2, weight_decay=0.1, backend="torch")
    resumed.load_state_dict(saved)
    adam_run(resumed, resumed_params, 2, start=3)
    for k in params:
        assert torch.equal(params[k], resumed_params[k]), k

    # a state tensor replaced by hand: the next step reads it (here: a zeroed first moment)
    p = params["w1"]
    opt.state[p]["exp_avg"] = torch.zeros_like(p)
    opt.zero_grad()
    loss_fn(params, 5).backward()
    grad = p.grad.clone()
    opt.step()
    assert torch.equal(opt.state[p]["exp_avg"], torch.lerp(torch.zeros_like(p), grad, 1 - 0.9))


def test_left_to_right_sums_are_the_loop_of_additions():
    batch, _ = make_batch(alone=False)
    g = torch.Generator().manual_seed(5)
    values = torch.randn(40, dtype=torch.float64, generator=g) * torch.logspace(-12, 12, 40, dtype=torch.float64)
    rows = torch.randn(40, 3, dtype=torch.float64, generator=g) * 1e8
    start = torch.tensor(0.1, dtype=torch.float64)

    def loop(terms, out):
        for v in terms:
            out = out + v
        return out
    zero = torch.zeros((), dtype=torch.float64)
    assert torch.equal(batch.reduce(values), loop(values.unbind(), zero))
    assert torch.equal(batch.reduce(values, start), loop(values.unbind(), start))
    assert torch.equal(batch.total(values.unbind(), start), loop(values.unbind(), start))
    assert torch.equal(batch.reduce_rows(rows), loop(rows.unbind(0), zero))
    assert torch.equal(batch.reduce(values[:0], start), start)
