"""A character-level GPT trained on text that ships with CPython (no download), and the ``train`` command.

The corpus is the help text in ``pydoc_data.topics`` (about 0.46M characters); the last 10% is held out.
Every run starts from the same seed, sees the same batches and is scored on the same held-out batches,
so optimizers are compared on equal terms and a run is reproducible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .optimizers import Contender, backward, contender, live_values, step
from .output import Output, UsageError, markdown_table, new_figure

VAL_BATCHES, VAL_BATCH = 8, 64


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


@dataclass(frozen=True)
class ModelSize:
    width: int = 128
    layers: int = 2
    heads: int = 4
    context: int = 64
    batch: int = 32

    def check(self, data) -> None:
        for name in ("width", "layers", "heads", "context", "batch"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise UsageError(f"--width {self.width} must be a multiple of --heads {self.heads}")
        shortest = min(len(data[0]), len(data[1]))
        if self.context + 1 >= shortest:
            raise UsageError(f"--context {self.context} is longer than the held-out text ({shortest} characters)")


@dataclass
class RunResult:
    optimizer: str
    train_losses: list[float]
    val_bpc: float
    seconds: float
    steps: int
    tokens: int
    live: list[float] = field(default_factory=list)  # the step size after every step (see Contender.live)

    @property
    def step_ms(self) -> float:
        return 1e3 * self.seconds / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def evaluate_bpc(model: nn.Module, val_ids: torch.Tensor, context: int, device) -> float:
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    with torch.no_grad():
        val = [F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
               for x, y in (sample_batch(val_ids, VAL_BATCH, context, gen) for _ in range(VAL_BATCHES))]
    model.train()
    return float(torch.stack(val).mean()) / math.log(2)


def train(optimizer: str | Contender | Callable, steps: int, *, width=128, layers=2, heads=4, context=64,
          batch=32, seed=0, device="cpu", data=None, lr: float | None = None, progress: bool = False) -> RunResult:
    """Train from a fixed seed. ``optimizer`` is a contender (or its name), or a ``(params, steps)`` factory."""
    data = data or load_corpus()
    size = ModelSize(width, layers, heads, context, batch)
    size.check(data)
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    train_ids, val_ids, vocab = data
    torch.manual_seed(seed)
    model = CharTransformer(len(vocab), width, layers, heads, context).to(device)
    if isinstance(optimizer, str):
        optimizer = contender(optimizer)
    if isinstance(optimizer, Contender):
        opt, live_keys, name = optimizer.build(model.parameters(), steps, lr), optimizer.live, optimizer.name
    else:
        opt, live_keys, name = optimizer(model.parameters(), steps), (), None
    name = name or type(opt).__name__
    gen = torch.Generator().manual_seed(seed)
    losses, lives = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"{name:<14}", unit="step", leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    for t in range(steps):
        x, y = (t.to(device) for t in sample_batch(train_ids, batch, context, gen))
        opt.zero_grad(set_to_none=True)
        # detached: the graph has been backpropagated, and reading a loss that still requires grad (the
        # progress bar's float(loss)) made torch warn "Converting a tensor with requires_grad=True to a scalar"
        loss = backward(opt, model(x), y).detach()
        step(opt, loss)
        losses.append(loss)  # kept on the device: the loop never waits for the GPU
        values = live_values(opt, live_keys)
        if live_keys:
            lives.append(values[live_keys[0]])
        if bar is not None:
            bar.update(1)
            if t % 10 == 0 or t == steps - 1:  # reading values here synchronizes: only every 10 steps
                bar.set_postfix({"loss": f"{float(loss):.3f}", **{k: f"{float(v):.3g}" for k, v in values.items()}})
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    val_bpc = evaluate_bpc(model, val_ids, context, device)
    return RunResult(name, [float(l) for l in losses], val_bpc, seconds, steps, steps * batch * context,
                     [float(v) for v in lives])


def smooth(values: list[float], window: int = 20) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def report(results: list[RunResult], out: Output, title: str) -> str:
    """The table (val bits/char, step time, tokens/s) and the loss and step-size figures."""
    best = min(r.val_bpc for r in results)
    rows = [[r.optimizer, f"{r.val_bpc:.3f}", f"{100 * (r.val_bpc / best - 1):+.1f}%",
             f"{sum(r.train_losses[-20:]) / len(r.train_losses[-20:]):.3f}", f"{r.step_ms:.1f}",
             f"{r.tokens_per_s:,.0f}"] for r in results]
    table = f"### {title}\n\n" + markdown_table(
        ["optimizer", "val bits/char", "vs best", "train loss (last 20)", "ms/step", "tokens/s"], rows)
    out.text("table.md", table)
    out.json("results.json", [r.__dict__ for r in results])

    fig, axes = new_figure()
    ax = axes[0][0]
    for r in results:
        ax.plot(smooth(r.train_losses), label=f"{r.optimizer} (val {r.val_bpc:.2f} bpc)")
    ax.set(xlabel="step", ylabel="train loss (nats/char, 20-step mean)", title=title)
    ax.legend(fontsize=8)
    out.figure("loss.png", fig)

    fig, axes = new_figure()
    ax = axes[0][0]
    for r in results:
        if r.live and all(v > 0 for v in r.live):
            ax.plot(r.live, label=r.optimizer)
    ax.set(xlabel="step", ylabel="step size (lr, or d·γ·… of the method)", yscale="log",
           title="the step size each method chose")
    ax.legend(fontsize=8)
    out.figure("step_size.png", fig)
    return table


def run_train(optimizers: list[Contender], steps: int, size: ModelSize, seed: int, device, adamw_lr: float,
              out: Output, progress: bool = True) -> list[RunResult]:
    data = load_corpus()
    size.check(data)
    print(f"char-level GPT on pydoc topics: {len(data[0]):,} training characters, {steps} steps of "
          f"{size.batch}x{size.context} characters, width {size.width}, {size.layers} layers, device {device}")
    results = []
    for c in optimizers:
        results.append(train(c, steps, width=size.width, layers=size.layers, heads=size.heads, context=size.context,
                             batch=size.batch, seed=seed, device=str(device), data=data,
                             lr=adamw_lr if c.takes_lr else None, progress=progress))
    print()
    print(report(results, out, f"char-GPT, {steps} steps (seed {seed})"))
    print("written: " + ", ".join(str(p) for p in out.written))
    return results
