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
