"""A small character-level transformer trained on text that ships with CPython (no download).

``python -m lrfree`` trains it with a few lrfree optimizers, none given a learning rate, next to AdamW
at a fixed learning rate, and prints held-out bits per character. The corpus is the help text in
``pydoc_data.topics``; the last 10% of it is held out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import lrfree


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids, validation ids, vocabulary) of the pydoc topics text."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[key] for key in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    return ids[:split], ids[split:], vocab


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).transpose(1, 3).unbind(2)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be a multiple of heads={heads}")
        self.context = context
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def sample_batch(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    starts = torch.randint(len(data) - context - 1, (batch,), generator=generator)
    x = torch.stack([data[s:s + context] for s in starts])
    y = torch.stack([data[s + 1:s + context + 1] for s in starts])
    return x, y


# What the example compares: lrfree methods get no learning rate at all.
OPTIMIZERS: dict[str, Callable] = {
    "PSDASGD": lambda params, steps: lrfree.PSDASGD(params),
    "InexactPolyak": lambda params, steps: lrfree.InexactPolyak(params, T=steps),
    "Prodigy": lambda params, steps: lrfree.Prodigy(params),
    "DAdaptAdam": lambda params, steps: lrfree.DAdaptAdam(params),
    "PSSPS": lambda params, steps: lrfree.PSSPS(params),
    "AdamW(lr=3e-3)": lambda params, steps: lrfree.AdamW(params, lr=3e-3, weight_decay=0.0),
}
DEFAULT_OPTIMIZERS = ("PSDASGD", "InexactPolyak", "Prodigy", "AdamW(lr=3e-3)")


@dataclass
class RunResult:
    optimizer: str
    train_losses: list[float]
    val_bpc: float
    seconds: float


def train(optimizer: str | Callable, steps: int, *, width=128, layers=2, heads=4, context=64, batch=32, seed=0,
          device="cpu", data=None) -> RunResult:
    """Train from a fixed seed; ``optimizer`` is a name from OPTIMIZERS or a ``(params, steps)`` factory."""
    train_ids, val_ids, vocab = data or load_corpus()
    torch.manual_seed(seed)
    model = CharTransformer(len(vocab), width, layers, heads, context).to(device)
    make = OPTIMIZERS[optimizer] if isinstance(optimizer, str) else optimizer
    opt = make(model.parameters(), steps)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        x, y = (t.to(device) for t in sample_batch(train_ids, batch, context, gen))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step(loss=loss)
        losses.append(loss.detach())
    seconds = time.perf_counter() - start
    val_gen = torch.Generator().manual_seed(1234)
    model.eval()
    with torch.no_grad():
        val = [F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
               for x, y in (sample_batch(val_ids, 64, context, val_gen) for _ in range(8))]
    val_bpc = float(torch.stack(val).mean()) / math.log(2)
    name = optimizer if isinstance(optimizer, str) else type(opt).__name__
    return RunResult(name, [float(l) for l in losses], val_bpc, seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lrfree",
                                     description="Train a small character-level transformer with lrfree optimizers.")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                        help=f"comma-separated, from: {', '.join(OPTIMIZERS)}")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(OPTIMIZERS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but no CUDA device is available")
    data = load_corpus()
    print(f"char-level transformer on pydoc topics ({len(data[0])} training characters), {args.steps} steps")
    print(f"{'optimizer':<16}{'val bits/char':>14}{'final train loss':>18}{'seconds':>10}")
    for name in names:
        r = train(name, args.steps, device=args.device, data=data)
        tail = r.train_losses[-min(20, len(r.train_losses)):]
        print(f"{name:<16}{r.val_bpc:>14.3f}{sum(tail) / len(tail):>18.3f}{r.seconds:>10.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
