r"""Model kinds: the training recipes around Pyro model/guide pairs (see :mod:`.base`)."""

from .base import ModelKind, StepState

__all__ = ["ModelKind", "StepState"]
