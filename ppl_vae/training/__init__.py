r"""The one trainer for every model kind, its callbacks and the run directory's bookkeeping."""

from .callbacks import Callback, CallbackList, EpochFunction
from .trainer import Settings, Trainer, TrainingError

__all__ = ["Callback", "CallbackList", "EpochFunction", "Settings", "Trainer", "TrainingError"]
