"""The multi-tensor launch layer against plain torch: block maps, pointer tables, layouts, and the
deterministic per-tensor reduction of block partials (sums and maxima, many blocks per tensor)."""

import pytest
import torch

from lrfree.kernels import multi_tensor as mt

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_geometry_covers_every_element_once():
    tensors = [torch.zeros(n, device=DEVICE) for n in (1, 16, 17, 100, 3)]
    geo = mt.geometry([tensors], block=16)
    starts, owners = geo.block_start.cpu().tolist(), geo.block_tensor.cpu().tolist()
    assert geo.block_start.dtype == torch.int64
    for i, t in enumerate(tensors):
        mine = [s for s, o in zip(starts, owners) if o == i]
        assert mine == list(range(0, t.numel(), 16))
    assert geo.block_first.cpu().tolist() == [0, 1, 2, 4, 11, 12]
    assert geo.pointers.cpu()[0].tolist() == [t.data_ptr() for t in tensors]
    assert mt.geometry([tensors], block=16) is geo  # cached while the tensors stay the same


@pytest.mark.parametrize("k, max_columns", [(1, ()), (3, (1,)), (2, (0, 1))])
def test_per_tensor_reduction_matches_torch(k, max_columns):
    sizes = (5, 16 * 300 + 7, 1, 16 * 129)  # blocks: 1, 301, 1, 129 (more than one chunk of 128)
    tensors = [torch.zeros(n, device=DEVICE) for n in sizes]
    geo = mt.geometry([tensors], block=16)
    g = torch.Generator().manual_seed(0)
    partials = torch.randn(geo.n_blocks, k, generator=g, dtype=torch.float32).to(DEVICE)
    out = mt.per_tensor(partials, geo, max_columns)
    bounds = geo.block_first.cpu().tolist()
    for i in range(len(sizes)):
        rows = partials[bounds[i]:bounds[i + 1]].double()
        for c in range(k):
            expected = rows[:, c].max() if c in max_columns else rows[:, c].sum()
            assert float(out[i, c]) == pytest.approx(float(expected), rel=1e-12, abs=1e-12)
    again = mt.per_tensor(partials, geo, max_columns)
    assert torch.equal(out, again)  # the same reduction order every time


def test_dense_layouts_are_accepted_and_gapped_ones_rejected():
    weight = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    grad = torch.randn_like(weight)  # preserves the channels_last layout
    assert mt.dense(weight) and not weight.is_contiguous()
    mt.geometry([[weight], [grad]])
    view = torch.randn(6, 8)[:, :5]
    assert not mt.dense(view)
    with pytest.raises(ValueError, match="dense"):
        mt.geometry([[view]])
    with pytest.raises(ValueError, match="one memory layout"):
        mt.geometry([[weight], [torch.randn(4, 3, 5, 5)]])


@pytest.mark.parametrize("max_columns", [(), (1,)])
def test_long_tensors_reduce_in_two_levels(monkeypatch, max_columns):
    """A tensor with more block rows than one program walks (REDUCE_ROWS) is reduced chunk by chunk, then
    per tensor; the result is the one-level reduction's (fp64 sums of the same values)."""
    monkeypatch.setattr(mt, "REDUCE_ROWS", 64)
    sizes = (16 * 300 + 7, 5, 16 * 129, 16 * 64)  # blocks: 301 (5 chunks), 1, 129 (3 chunks), 64 (one chunk)
    tensors = [torch.zeros(n, device=DEVICE) for n in sizes]
    geo = mt.geometry([tensors], block=16)
    assert geo.reduction is not None and geo.reduction.n_chunks == 5 + 1 + 3 + 1
    g = torch.Generator().manual_seed(1)
    partials = torch.randn(geo.n_blocks, 2, generator=g, dtype=torch.float32).to(DEVICE)
    before = mt.launch_count
    out = mt.per_tensor(partials, geo, max_columns)
    assert mt.launch_count - before == 2
    bounds = geo.block_first.cpu().tolist()
    for i in range(len(sizes)):
        rows = partials[bounds[i]:bounds[i + 1]].double()
        for c in range(2):
            expected = rows[:, c].max() if c in max_columns else rows[:, c].sum()
            assert float(out[i, c]) == pytest.approx(float(expected), rel=1e-12, abs=1e-12)


def test_short_tensors_reduce_in_one_launch():
    geo = mt.geometry([[torch.zeros(16 * 100, device=DEVICE)]], block=16)
    assert geo.reduction is None
    before = mt.launch_count
    mt.per_tensor(torch.ones(geo.n_blocks, 1, device=DEVICE), geo)
    assert mt.launch_count - before == 1


def test_alignment_decides_the_128_bit_path():
    """A tensor list is ``aligned`` when every tensor starts on a 16-byte boundary and has 16·k elements;
    a view at an odd offset or an odd size takes the scalar path."""
    buf = torch.zeros(2 * 4096 + 8, device=DEVICE)
    whole, shifted = buf[:4096], buf[1:4097]  # both dense; the second starts 4 bytes in
    assert whole.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 == 4
    assert mt.geometry([[whole], [torch.zeros(4096, device=DEVICE)]]).aligned
    assert not mt.geometry([[whole], [shifted]]).aligned
    assert not mt.geometry([[torch.zeros(4095, device=DEVICE)]]).aligned
    assert not mt.geometry([[whole, torch.zeros(17, device=DEVICE)]]).aligned


def test_unaligned_tensors_launch_apart_and_step_like_the_reference():
    """An optimizer over aligned and unaligned tensors launches each class apart (one compile-time variant
    each) and steps both exactly as the torch reference does."""
    import lrfree
    from lrfree.kernels import aot
    buf = torch.randn(4096 + 4, dtype=torch.float64, device=DEVICE)
    params = {"aligned": buf[:4096].clone(), "shifted": buf[1:4097], "odd": buf[:37].clone()}
    runs = {}
    for backend in ("torch", "triton"):
        ps = [p.clone().requires_grad_() if k != "shifted" else
              torch.zeros(4097, dtype=torch.float64, device=DEVICE)[1:].copy_(p).requires_grad_()
              for k, p in params.items()]
        opt = lrfree.Adam(ps, lr=1e-2, backend=backend)
        for t in range(2):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (i + 1 + t))
            opt.step()
        runs[backend] = ps
    for a, b in zip(runs["torch"], runs["triton"]):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)
    with aot.recording() as rec:
        lrfree.Adam(runs["triton"], lr=1e-2, backend="triton").step()
    adam = [launch for launch in rec.launches if launch.name == "adam._adam_kernel"]
    assert sorted(launch.kwargs["ALIGNED"] for launch in adam) == [False, True]
