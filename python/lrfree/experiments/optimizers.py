"""The optimizers the experiments compare, by name: lrfree's methods with no learning rate, and the
tuned baselines (a fixed or swept ``lr``). ``NAME:bf16`` is lrfree's optimizer NAME with its statistics
stored in bf16 (``state_dtype=torch.bfloat16``, lrfree.precision), compared on the same seeds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import lrfree

from .output import UsageError


@dataclass(frozen=True)
class Contender:
    name: str
    # (params, steps, lr, **options) -> optimizer; lr is None for learning-rate-free methods, options are
    # lrfree's optimizer-wide ones (state_dtype)
    make: Callable
    live: tuple[str, ...] = ()  # step scalars shown live; the first is recorded and plotted (its step size)
    takes_lr: bool = False  # a baseline whose lr is fixed (train) or swept (reproduce lrfree)
    options: tuple[tuple[str, object], ...] = ()

    def build(self, params, steps: int, lr: float | None = None):
        if self.takes_lr and lr is None:
            raise UsageError(f"{self.name} needs a learning rate")
        return self.make(params, steps, lr, **dict(self.options))


def _free(cls, **kwargs):
    return lambda params, steps, lr, **options: cls(params, **kwargs, **options)


def _torch(cls, **kwargs):
    """A torch.optim baseline: it takes none of lrfree's options."""
    return lambda params, steps, lr: cls(params, lr=lr, **kwargs)


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("PSDASGD", _free(lrfree.PSDASGD), ("step_size", "d")),
    # the paper's "a momentum of 0.9" read as D-Adapt SGD's primal averaging (with β1 = 0), and the growth
    # cap measured as the best safeguard on the digits (docs/RESULTS.md, "PS-DA-SGD's defaults")
    Contender("PSDASGD-averaging", _free(lrfree.PSDASGD, momentum=0.9, betas=(0.0, 0.999)), ("step_size", "d")),
    Contender("PSDASGD-capped", _free(lrfree.PSDASGD, growth_rate=1.2), ("step_size", "d")),
    Contender("PSSPS", _free(lrfree.PSSPS), ("step_size",)),
    Contender("InexactPolyak", lambda params, steps, lr, **o: lrfree.InexactPolyak(params, T=steps, **o),
              ("step_size",)),
    Contender("Prodigy", _free(lrfree.Prodigy), ("step_size", "d")),
    Contender("DAdaptAdam", _free(lrfree.DAdaptAdam), ("step_size", "d")),
    Contender("DAdaptSGD", _free(lrfree.DAdaptSGD), ("step_size", "d")),
    Contender("DoG", _free(lrfree.DoG), ("eta",)),
    Contender("SPS", _free(lrfree.SPS), ("step_size",)),
    Contender("COCOB", _free(lrfree.COCOB)),
    Contender("GLyDER", lambda params, steps, lr, **o: lrfree.GLyDER(lrfree.Adam(params, **o)), ("step_size",)),
    Contender("GLyDER-split", lambda params, steps, lr, **o: lrfree.GLyDER(lrfree.Adam(params, **o),
                                                                           gradient="split"), ("step_size",)),
    Contender("AdamW", lambda params, steps, lr, **o: lrfree.AdamW(params, lr=lr, weight_decay=0.0, **o), ("lr",),
              True),
    Contender("Adam", _torch(torch.optim.Adam), ("lr",), True),
    Contender("SGD", _torch(torch.optim.SGD, momentum=0.9), ("lr",), True),
]}
TORCH_BASELINES = ("Adam", "SGD")
BF16_STATE = ":bf16"  # the suffix of a contender stepped with state_dtype=torch.bfloat16


def contender(name: str) -> Contender:
    base_name = name.removesuffix(BF16_STATE)
    found = CONTENDERS.get(base_name)
    if found is None:
        raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(CONTENDERS)}, each of lrfree's "
                         f"also as NAME{BF16_STATE} (its state in bf16)")
    if name == base_name:
        return found
    if base_name in TORCH_BASELINES:
        raise UsageError(f"{name!r}: {base_name} is torch.optim's, which has no state_dtype; "
                         f"AdamW{BF16_STATE} is lrfree's AdamW with bf16 state")
    return dataclasses.replace(found, name=name, options=(("state_dtype", torch.bfloat16),))


def parse_names(text: str) -> list[Contender]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("no optimizer named; give a comma-separated list")
    return [contender(n) for n in names]


def live_values(opt, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The optimizer's live scalars ``keys`` as 0-d tensors, without a host sync (read them later)."""
    if not keys:
        return {}
    scalars = {} if keys == ("lr",) else opt.scalars()
    out = {}
    for key in keys:
        value = torch.tensor(float(opt.param_groups[0]["lr"])) if key == "lr" else scalars[key]
        out[key] = value.reshape(-1)[0] if value.dim() else value
    return out


def step(opt, loss: torch.Tensor) -> None:
    """``opt.step()``, with the loss for lrfree optimizers (the Polyak-type methods need it)."""
    if isinstance(opt, lrfree.FusedOptimizer):
        opt.step(loss=loss.detach())
    else:
        opt.step()


def backward(opt, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of ``logits`` (…, C) against ``targets`` (…), backpropagated the way ``opt`` needs
    it, and returned: GLyDER also gets its sampled-label gradient for the Gauss–Newton curvature (one extra
    backward through the same graph) and, with ``gradient="split"``, the two halves of the batch."""
    flat, labels = logits.flatten(0, -2), targets.flatten()
    glyder = opt if isinstance(opt, lrfree.GLyDER) else None
    if glyder is not None and glyder.curvature == "gnb":
        glyder.gnb_backward(logits)
    if glyder is not None and glyder.gradient == "split":
        half = logits.shape[0] // 2  # by examples (rows of the batch), so each half is a minibatch
        loss_a = F.cross_entropy(logits[:half].flatten(0, -2), targets[:half].flatten())
        loss_b = F.cross_entropy(logits[half:].flatten(0, -2), targets[half:].flatten())
        glyder.split_backward(loss_a, loss_b)
        return F.cross_entropy(flat.detach(), labels)
    loss = F.cross_entropy(flat, labels)
    loss.backward()
    return loss
