"""LLM-shaped parameter sets with random gradients.

Optimizer step time depends on the element count and on how it is split into tensors (launch overhead,
per-tensor work of the reference implementations), so workloads copy the tensor lists of real models:

* ``gpt2``: GPT-2's 148 tensors (token/position embeddings, per layer LayerNorms, fused QKV, projections
  and MLP with biases, final LayerNorm); 124M parameters at the real size.
* ``llama``: a LLaMA-style decoder without biases (per layer q/k/v/o, gate/up/down, two RMSNorms) with
  untied embeddings: 12 layers at width 2048 give 738M parameters in 111 tensors.
* ``sweep``: the LLaMA shape at a fixed 111 tensors with the width chosen for a target element count, so
  step time against size shows how a method scales with the parameter count alone.

Gradients are N(0, 1e-3²) (a typical LLM gradient entry); the loss the Polyak-type methods need is 3.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRAD_STD = 1e-3
LOSS = 3.0


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    sweep: bool = False  # a point of the scaling sweep

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def param_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def label(self) -> str:
        return f"{self.name}-{self.dtype_name}"


def gpt2_shapes(layers: int, width: int, vocab: int, context: int) -> tuple[tuple[int, ...], ...]:
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,),                      # ln_1
                   (width, 3 * width), (3 * width,),        # attn.c_attn
                   (width, width), (width,),                # attn.c_proj
                   (width,), (width,),                      # ln_2
                   (width, 4 * width), (4 * width,),        # mlp.c_fc
                   (4 * width, width), (width,)]            # mlp.c_proj
    return tuple(shapes + [(width,), (width,)])             # ln_f


def llama_shapes(layers: int, width: int, ffn: int, vocab: int) -> tuple[tuple[int, ...], ...]:
    shapes: list[tuple[int, ...]] = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn)] + [(width,), (width,)]
    return tuple(shapes + [(width,), (vocab, width)])


def sweep_shapes(target_numel: int) -> tuple[tuple[int, ...], ...]:
    """111 LLaMA-shaped tensors with ffn = 8/3·width and vocab = 16·width: ≈ 176·width² elements."""
    width = max(8, 8 * round(math.sqrt(target_numel / 176) / 8))
    return llama_shapes(12, width, ffn=8 * width // 3, vocab=16 * width)


def _named(sizes: dict[str, tuple], dtypes: tuple[torch.dtype, ...]) -> list[Workload]:
    return [Workload(name, shapes, dtype) for name, shapes in sizes.items() for dtype in dtypes]


def _sweep(lo: int, hi: int) -> list[Workload]:
    out, n = [], lo
    while n <= hi:
        shapes = sweep_shapes(n)
        out.append(Workload(f"sweep-{_short(sum(math.prod(s) for s in shapes))}", shapes, torch.float32, sweep=True))
        n *= 4
    return out


def _short(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


# Device operations per step (bench/test_step.py::test_device_ops) do not depend on the sizes, only on the
# tensor count and layout: GPT-2's 148 tensors at a width the Triton interpreter steps in seconds on a CPU.
DEVICE_OPS = Workload("gpt2-layout", gpt2_shapes(12, 16, 64, 8), torch.float32)

MODES = ("smoke", "quick", "full", "check")
# (timed rounds, warm-up rounds) per benchmark; the GPU check trades rounds for its time budget. Quick mode
# runs on shared CPUs: with 10 rounds, repeated runs on this project's 2-vCPU machine put the same step
# 10-25% apart; 40 rounds cost ~1 s more per contender
ROUNDS = {"smoke": (2, 1), "quick": (40, 5), "full": (30, 5), "check": (12, 3)}


def has_sweep(mode: str) -> bool:
    return mode in ("quick", "full")


def workloads(mode: str, max_numel: int | None = None) -> list[Workload]:
    """The workloads of a benchmark mode; ``max_numel`` caps the sweep (what fits in memory)."""
    if mode == "smoke":  # CI: every code path at a size the Triton interpreter runs in seconds
        return _named({"gpt2-tiny": gpt2_shapes(1, 16, 64, 8)}, (torch.float32, torch.bfloat16))
    if mode == "quick":  # a CPU: the same shapes, narrow
        named = _named({"gpt2-narrow": gpt2_shapes(12, 64, 2048, 256),
                        "llama-narrow": llama_shapes(12, 128, 344, 2048)}, (torch.float32, torch.bfloat16))
        return named + _sweep(2**16, min(2**22, max_numel or 2**22))
    if mode == "full":
        named = _named({"gpt2-124M": gpt2_shapes(12, 768, 50257, 1024),
                        "llama-738M": llama_shapes(12, 2048, 5504, 32000)}, (torch.float32, torch.bfloat16))
        return named + _sweep(2**20, max_numel or 2**31)
    if mode == "check":  # bench/gpu_check.sh: the sizes the speed targets are stated at, nothing more
        return (_named({"llama-738M": llama_shapes(12, 2048, 5504, 32000)}, (torch.float32,))
                + _named({"gpt2-124M": gpt2_shapes(12, 768, 50257, 1024)}, (torch.float32, torch.bfloat16)))
    raise ValueError(f"unknown benchmark mode {mode!r}; expected one of {', '.join(MODES)}")


class Materialized:
    """A workload's parameters and gradients on a device; every contender starts from the same values."""

    def __init__(self, workload: Workload, device: torch.device, seed: int = 0):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.workload = workload
        self.device = device
        self.params = [(torch.randn(s, generator=gen, device=device) * 0.02).to(workload.dtype)
                       for s in workload.shapes]
        self.grads = [(torch.randn(s, generator=gen, device=device) * GRAD_STD).to(workload.dtype)
                      for s in workload.shapes]
        self.loss = torch.tensor(LOSS, device=device)

    def fresh_params(self) -> list[torch.Tensor]:
        """Copies of the parameters, each holding a copy of its gradient (optimizers may write grads)."""
        out = []
        for p, g in zip(self.params, self.grads):
            q = p.clone().requires_grad_()
            q.grad = g.clone()
            out.append(q)
        return out
