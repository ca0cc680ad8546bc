import os
import sys

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter; this must be set before
    # lrfree.kernels is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # and backend="cuda" runs the extension's host build (the GPU launch emulated on the CPU)
    os.environ.setdefault("LRFREE_CUDA_HOST", "1")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # tests import their helpers (awkward, oracles, optimizer_db)

torch.set_num_threads(min(2, torch.get_num_threads()))


def rel_err(actual, expected) -> float:
    """max |a − b| / max |b|, in fp64 (0 when both are exactly zero)."""
    a = torch.as_tensor(actual, dtype=torch.float64).cpu()
    b = torch.as_tensor(expected, dtype=torch.float64).cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale) if a.numel() else 0.0


@pytest.fixture
def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
