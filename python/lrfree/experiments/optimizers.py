"""The optimizers the experiments compare, by name: lrfree's methods with no learning rate, and the
tuned baselines (a fixed or swept ``lr``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import lrfree

from .output import UsageError


@dataclass(frozen=True)
class Contender:
    name: str
    make: Callable  # (params, steps, lr) -> optimizer; lr is None for learning-rate-free methods
    live: tuple[str, ...] = ()  # step scalars shown live; the first is recorded and plotted (its step size)
    takes_lr: bool = False  # a baseline whose lr is fixed (train) or swept (reproduce lrfree)

    def build(self, params, steps: int, lr: float | None = None):
        if self.takes_lr and lr is None:
            raise UsageError(f"{self.name} needs a learning rate")
        return self.make(params, steps, lr)


def _free(cls, **kwargs):
    return lambda params, steps, lr: cls(params, **kwargs)


CONTENDERS: dict[str, Contender] = {c.name: c for c in [
    Contender("PSDASGD", _free(lrfree.PSDASGD), ("step_size", "d")),
    # the paper's "a momentum of 0.9" read as D-Adapt SGD's primal averaging (with β1 = 0), and the growth
    # cap measured as the best safeguard on the digits (docs/RESULTS.md, "PS-DA-SGD's defaults")
    Contender("PSDASGD-averaging", _free(lrfree.PSDASGD, momentum=0.9, betas=(0.0, 0.999)), ("step_size", "d")),
    Contender("PSDASGD-capped", _free(lrfree.PSDASGD, growth_rate=1.2), ("step_size", "d")),
    Contender("PSSPS", _free(lrfree.PSSPS), ("step_size",)),
    Contender("InexactPolyak", lambda params, steps, lr: lrfree.InexactPolyak(params, T=steps), ("step_size",)),
    Contender("Prodigy", _free(lrfree.Prodigy), ("step_size", "d")),
    Contender("DAdaptAdam", _free(lrfree.DAdaptAdam), ("step_size", "d")),
    Contender("DAdaptSGD", _free(lrfree.DAdaptSGD), ("step_size", "d")),
    Contender("DoG", _free(lrfree.DoG), ("eta",)),
    Contender("SPS", _free(lrfree.SPS), ("step_size",)),
    Contender("COCOB", _free(lrfree.COCOB)),
    Contender("GLyDER", lambda params, steps, lr: lrfree.GLyDER(lrfree.Adam(params)), ("step_size",)),
    Contender("GLyDER-split", lambda params, steps, lr: lrfree.GLyDER(lrfree.Adam(params), gradient="split"),
              ("step_size",)),
    Contender("AdamW", lambda params, steps, lr: lrfree.AdamW(params, lr=lr, weight_decay=0.0), ("lr",), True),
    Contender("Adam", lambda params, steps, lr: torch.optim.Adam(params, lr=lr), ("lr",), True),
    Contender("SGD", lambda params, steps, lr: torch.optim.SGD(params, lr=lr, momentum=0.9), ("lr",), True),
]}


def contender(name: str) -> Contender:
    found = CONTENDERS.get(name)
    if found is None:
        raise UsageError(f"unknown optimizer {name!r}; choose from {', '.join(CONTENDERS)}")
    return found


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
