r"""Callbacks: the one way anything hooks into training (figures, probes, trackers).

A callback sees the :class:`~ppl_vae.training.trainer.Trainer` (its kind, history, run directory
and configuration) at four points: before the first epoch, after every epoch (with that epoch's
history row), after the test metrics are computed, and when figures have been written. Under
``torchrun`` only rank 0 calls :meth:`Callback.on_evaluated` and :meth:`Callback.on_figures`
(it alone evaluates and writes); :meth:`Callback.on_epoch_end` runs on every rank, because a
probe may need every rank's gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["Callback", "CallbackList", "EpochFunction"]


class Callback:
    """Base class: every hook does nothing; override the ones you need."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first epoch of this process (after a resume: before the resumed one)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        """After epoch ``epoch`` (counted from 1), its validation and its history ``row``."""

    def on_evaluated(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """After the test metrics are computed (rank 0 only)."""

    def on_figures(self, trainer: Trainer, paths: Sequence[Path]) -> None:
        """After the run's figures were written to ``paths`` (rank 0 only)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """When the run ends, normally or by an error (close files, flush trackers)."""


class EpochFunction(Callback):
    """Adapter for ``fn(epoch, module, history)``, the form of ``fit(on_epoch_end=...)``."""

    def __init__(self, fn: Callable[[int, Any, list[dict[str, float]]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        self.fn(epoch, trainer.kind.module, trainer.history)


class CallbackList(Callback):
    """Calls each callback in order; :meth:`on_train_end` reaches every one even if one fails."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(
                    f"callbacks must be ppl_vae.training.Callback instances, got {type(cb).__name__}"
                )
        self.callbacks = list(callbacks)

    def on_train_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_epoch_end(trainer, epoch, row)

    def on_evaluated(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_evaluated(trainer, metrics)

    def on_figures(self, trainer: Trainer, paths: Sequence[Path]) -> None:
        for cb in self.callbacks:
            cb.on_figures(trainer, paths)

    def on_train_end(self, trainer: Trainer) -> None:
        error: BaseException | None = None
        for cb in self.callbacks:
            try:
                cb.on_train_end(trainer)
            except Exception as e:  # every callback gets to close; the first error is raised
                error = error or e
        if error is not None:
            raise error
