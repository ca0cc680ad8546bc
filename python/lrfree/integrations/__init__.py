"""Glue between lrfree and training frameworks.

Each submodule imports its framework only when it is used, so ``import lrfree`` never needs them:

* :mod:`lrfree.integrations.lightning`: ``LRFreeCallback`` for ``lightning.Trainer``;
* :mod:`lrfree.integrations.transformers`: ``LRFreeTrainerMixin`` / ``lrfree_trainer`` and
  ``make_optimizer`` for the Hugging Face ``transformers.Trainer``.
"""

from __future__ import annotations

from typing import Any, Iterator

from ..optimizer import FusedOptimizer


def lrfree_optimizers(optimizer: Any) -> Iterator[FusedOptimizer]:
    """The lrfree optimizer(s) inside a framework's wrapper (Lightning's ``LightningOptimizer``,
    accelerate's ``AcceleratedOptimizer``), found through their ``optimizer`` / ``_optimizer`` attribute."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, FusedOptimizer):
            yield optimizer
            return
        inner = optimizer.__dict__.get("_optimizer") if hasattr(optimizer, "__dict__") else None
        optimizer = inner if inner is not None else getattr(optimizer, "optimizer", None)
