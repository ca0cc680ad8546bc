"""PyTorch Lightning: ``LRFreeCallback`` (gradient accumulation for loss-driven methods, gradient clipping
under mixed precision).

::

    from lrfree.integrations.lightning import LRFreeCallback
    trainer = lightning.Trainer(callbacks=[LRFreeCallback()], accumulate_grad_batches=4,
                                precision="bf16-mixed", gradient_clip_val=1.0)

Lightning is imported by the callback's base class only when this module is imported.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from . import lrfree_optimizers

__all__ = ["LRFreeCallback"]


def _lrfree(trainer: Any) -> list:
    return [opt for o in trainer.optimizers for opt in lrfree_optimizers(o)]


class LRFreeCallback(Callback):
    """Makes lrfree optimizers work with the parts of ``lightning.Trainer`` that call ``step()`` on their own.

    * **Loss under automatic optimization.** Lightning calls ``step(closure)``; the closure returns the last
      micro-batch's loss divided by ``accumulate_grad_batches``, and with a ``GradScaler`` (``16-mixed``)
      the step gets no loss at all. The callback hands every micro-batch's loss (as Lightning
      backpropagates it, i.e. already divided by ``accumulate_grad_batches``) to
      ``optimizer.accumulate_loss``, so the step's loss is the mean loss of the accumulated batch — the
      loss whose gradient is in ``.grad``. Under a ``GradScaler`` the scaled loss is divided by the
      scale again, on the device. Manual optimization is left alone: pass ``step(loss=loss)`` there.
    * **Clipping under mixed precision.** lrfree unscales ``GradScaler``'s gradients inside ``step()``
      (``_step_supports_amp_scaling``), which Lightning reads as "cannot clip" and refuses
      ``gradient_clip_val`` (even under ``bf16-mixed``, which has no scaler). When the trainer clips, the
      callback turns that off for its optimizers: Lightning's scaler then unscales before clipping, as
      for torch's own optimizers (``GradScaler`` reads its overflow flag on the host then, once a step).
    """

    def __init__(self, accumulate_loss: bool = True):
        super().__init__()
        self.accumulate_loss = bool(accumulate_loss)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._allow_clipping(trainer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # the optimizers exist from here on (configure_optimizers has run)
        self._allow_clipping(trainer)

    @staticmethod
    def _allow_clipping(trainer: Any) -> None:
        if not trainer.gradient_clip_val:
            return
        for opt in _lrfree(trainer):
            # an instance attribute over the class's True: only this trainer's optimizers change
            opt._step_supports_amp_scaling = False

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # A new accumulation window: drop what a step skipped on the host by GradScaler left behind (the
        # optimizer clears the sum itself on every step it runs).
        if self.accumulate_loss and pl_module.automatic_optimization \
                and batch_idx % trainer.accumulate_grad_batches == 0:
            for opt in _lrfree(trainer):
                opt.reset_accumulated_loss()

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if not (self.accumulate_loss and pl_module.automatic_optimization):
            return
        loss = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # Lightning scales the loss before this hook; divide by the same device scale (no host read)
            loss = loss.float() / scaler._get_scale_async().to(loss.device)
        for opt in _lrfree(trainer):
            opt.accumulate_loss(loss)
