"""lrfree: learning-rate-free optimizers for PyTorch, with fused multi-tensor kernels.

Every optimizer is a drop-in :class:`torch.optim.Optimizer`::

    opt = lrfree.PSDASGD(model.parameters())          # no learning rate to tune
    loss = loss_fn(model(x), y); loss.backward()
    opt.step(loss=loss)     # Polyak-type methods need the loss; the others ignore it
    opt.zero_grad()
"""

__version__ = "0.1.0"

from .methods import (COCOB, SPS, AdaSPS, Adam, AdamW, ClippedSGD, DAdaptAdam, DAdaptSGD, DecSPS, DoG,
                      InexactPolyak, LDoG, Prodigy, PSDASGD, PSSPS)
from .glyder import GLyDER
from .optimizer import FusedOptimizer

__all__ = ["__version__", "FusedOptimizer", "Adam", "AdamW", "AdaSPS", "ClippedSGD", "COCOB", "DAdaptAdam",
           "DAdaptSGD", "DecSPS", "DoG", "GLyDER", "LDoG", "InexactPolyak", "Prodigy", "PSDASGD", "PSSPS", "SPS"]
