"""One module per method: its hyperparameters, state, element-wise math (torch reference) and scalar rule."""

from .adam import Adam, AdamW
from .adasps import AdaSPS
from .clipped_sgd import ClippedSGD
from .cocob import COCOB
from .dadapt_adam import DAdaptAdam
from .dadapt_sgd import DAdaptSGD
from .decsps import DecSPS
from .dog import DoG, LDoG
from .inexact_polyak import InexactPolyak
from .prodigy import Prodigy
from .ps_dasgd import PSDASGD
from .ps_sps import PSSPS
from .sps import SPS

__all__ = ["Adam", "AdamW", "AdaSPS", "ClippedSGD", "COCOB", "DAdaptAdam", "DAdaptSGD", "DecSPS", "DoG", "LDoG",
           "InexactPolyak", "Prodigy", "PSDASGD", "PSSPS", "SPS"]
