"""Hugging Face ``transformers.Trainer``: hand the loss to loss-driven methods, and build an optimizer
from the ``TrainingArguments``.

``Trainer`` calls ``optimizer.step()`` without arguments, and no ``TrainerCallback`` hook sees the loss,
so the loss is taken where the Trainer computes it: ``training_step``, which returns each micro-batch's
loss as it was backpropagated (divided by ``gradient_accumulation_steps`` unless the model already
normalized it by the accumulated batch's item count). ``LRFreeTrainerMixin`` hands that value to
``optimizer.accumulate_loss``, so the step's loss is the accumulated batch's mean loss::

    from lrfree.integrations.transformers import lrfree_trainer, make_optimizer
    args = TrainingArguments(..., lr_scheduler_type="constant")   # lr is a multiplier of the method's step
    trainer = lrfree_trainer()(model=model, args=args, train_dataset=ds,
                               optimizers=(make_optimizer(model, "InexactPolyak", args), None))

transformers is imported only when :func:`lrfree_trainer` is called.
"""

from __future__ import annotations

from typing import Any

import lrfree

from . import lrfree_optimizers

__all__ = ["LRFreeTrainerMixin", "lrfree_trainer", "make_optimizer"]


class LRFreeTrainerMixin:
    """Put before ``transformers.Trainer`` (or a subclass) in the bases: each micro-batch's loss goes to
    the lrfree optimizer's ``accumulate_loss``, which the next ``optimizer.step()`` consumes."""

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        for opt in lrfree_optimizers(self.optimizer):
            opt.accumulate_loss(loss)
        return loss


def lrfree_trainer(base: type | None = None) -> type:
    """``base`` (default ``transformers.Trainer``) with :class:`LRFreeTrainerMixin` in front."""
    if base is None:
        from transformers import Trainer as base
    return type(f"LRFree{base.__name__}", (LRFreeTrainerMixin, base), {})


def make_optimizer(model: Any, method: str | type, args: Any = None, **kwargs: Any) -> lrfree.FusedOptimizer:
    """The lrfree optimizer ``method`` (a name such as ``"PSDASGD"`` or a class) over the model's trainable
    parameters. With ``args`` (``TrainingArguments``), Inexact Polyak's horizon ``T`` defaults to
    ``args.max_steps`` (the number of optimizer steps; set ``max_steps``, an epoch count does not fix it
    before the data loader exists). Other keyword arguments go to the optimizer."""
    cls = getattr(lrfree, method, None) if isinstance(method, str) else method
    if not (isinstance(cls, type) and issubclass(cls, lrfree.FusedOptimizer)):
        names = ", ".join(n for n in lrfree.__all__ if n not in ("__version__", "FusedOptimizer"))
        raise ValueError(f"make_optimizer: method must name an lrfree optimizer ({names}), got {method!r}")
    if cls is lrfree.InexactPolyak and "T" not in kwargs:
        steps = getattr(args, "max_steps", -1) if args is not None else -1
        if steps is None or steps <= 0:
            raise ValueError("make_optimizer: InexactPolyak needs its horizon T: set TrainingArguments.max_steps "
                             "(> 0) or pass T=")
        kwargs["T"] = steps
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, **kwargs)
