"""DoG / LDoG statistics pass: per tensor ‖g + λx‖² and ‖x − x0‖² (R 12: x, g, x0; nothing written). It is
also the step's non-finite guard (its first column is non-finite whenever a gradient element is), so a
step is this pass and the shared SGD apply pass (R 8, W 4): 24 B per element in fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import program_elements, tensor_ptr
from .common import assemble, dtype_groups, launch, reduce_partials
from .sgd import sgd_apply  # noqa: F401  (DoG's apply pass)


@triton.jit
def _dog_stats_kernel(x_ptrs, g_ptrs, x0_ptrs, numels, block_tensor, block_start, decay, partials,
                      X: tl.constexpr, ACC: tl.constexpr, HAS_DECAY: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid, t, offs, mask = program_elements(numels, block_tensor, block_start, BLOCK, ALIGNED)
    x = tl.load(tensor_ptr(x_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(tensor_ptr(g_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(tensor_ptr(x0_ptrs, t, X, ALIGNED) + offs, mask=mask, other=0.0).to(ACC)
    if HAS_DECAY:
        g = g + tl.load(decay + t).to(ACC) * x
    dx = x - x0
    tl.store(partials + 2 * pid, tl.sum(g * g, axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum(dx * dx, axis=0))


def dog_stats(opt, batch, decay: torch.Tensor | None) -> torch.Tensor:
    parts = []
    for group in dtype_groups(batch, lambda it: (it.p, it.g, it.state["x0"])):
        geo = group.geo
        partials = group.partials(2)
        launch(_dog_stats_kernel, (geo.n_blocks,), geo.slot(0), geo.slot(1), geo.slot(2), geo.numels,
               geo.block_tensor, geo.block_start, group.take(decay) if decay is not None else partials, partials,
               X=group.tl_dtype, ACC=group.acc, HAS_DECAY=decay is not None, **group.tiling(warps=4))
        parts.append((group, reduce_partials(group, partials)))
    return assemble(batch, parts)
