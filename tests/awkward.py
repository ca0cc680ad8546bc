"""A small model with every shape a fused optimizer gets wrong: odd sizes, a 1-element tensor, an
embedding whose rows are touched sparsely, LayerNorm affine tensors, an all-zero-initialized tensor,
a tensor that never receives a gradient, and two param groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SHAPES = {
    "emb": (11, 6), "w1": (6, 7), "b1": (7,), "unused": (5, 2), "zero": (3,),   # group 0
    "ln_w": (7,), "ln_b": (7,), "w2": (7, 3), "scale": (1,),                    # group 1
}
GROUP0 = ("emb", "w1", "b1", "unused", "zero")
GROUP1 = ("ln_w", "ln_b", "w2", "scale")


def make_params(dtype=torch.float64, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for k, s in SHAPES.items()}
    params["zero"].zero_()
    params["ln_w"].add_(1.0)
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in params.items()}


def loss_fn(params: dict[str, torch.Tensor], step: int, loss_scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy of a tiny embedding → MLP → LayerNorm → linear model on a batch fixed by ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, SHAPES["emb"][0], (8,), generator=g)
    y = torch.randint(0, SHAPES["w2"][1], (8,), generator=g)
    P = params
    h = torch.tanh(P["emb"][idx.to(P["emb"].device)] @ P["w1"] + P["b1"])
    h = F.layer_norm(h, (h.shape[-1],), P["ln_w"], P["ln_b"])
    out = (h @ P["w2"]) * P["scale"] + P["zero"]
    return loss_scale * F.cross_entropy(out.float() if out.dtype in (torch.bfloat16, torch.float16) else out,
                                        y.to(out.device))


def param_groups(params: dict[str, torch.Tensor], group1: dict | None = None) -> list[dict]:
    """Two groups; ``group1`` holds per-group overrides for the second (e.g. weight decay)."""
    return [{"params": [params[k] for k in GROUP0]}, {"params": [params[k] for k in GROUP1], **(group1 or {})}]
