r"""TensorBoard tracker: a run's history, test metrics, config and figures as TensorBoard events.

Tags are the names the run directory already uses, so a curve in TensorBoard, a column of
``history.csv`` and a key of ``metrics.json`` read alike:

- every numeric column of an epoch's history row except ``epoch`` (``train_loss``, ``val_elbo``,
  ``kl_scale``, ``seconds``; for M2 ``loss``, ``val_accuracy``, ...) at global step = the epoch,
  counted from 1;
- every numeric scalar test metric by its ``metrics.json`` key, nested dicts joined with ``/``
  (``test_elbo``, ``prior_summary/...``), at the step of the last epoch;
- each PNG figure as the image ``figures/<file stem>`` at that step;
- the resolved config as the run's hyperparameters (HParams dashboard, with the ``test_*``
  metrics as its metrics) and as the text ``config``.

"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...models.errors import ConfigError
from ..callbacks import Callback
from .common import config_text, flatten, is_number, numeric_scalars

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from ..trainer import Trainer

__all__ = ["TensorBoardTracker"]

INSTALL_HINT = 'pip install "ppl-vae[tensorboard]"'


def load_summary_writer() -> type[SummaryWriter]:
    """``torch.utils.tensorboard.SummaryWriter``, or a :class:`ConfigError` naming the extra."""
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it; fail here, not mid-run)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"the TensorBoard tracker needs the tensorboard package ({e}); install it with: "
            f"{INSTALL_HINT}"
        ) from None
    return SummaryWriter


class TensorBoardTracker(Callback):
    r"""Log the run to TensorBoard through ``torch.utils.tensorboard.SummaryWriter``.

    Only rank 0 writes under ``torchrun``. Events are flushed after every epoch, so a killed run
    keeps its finished epochs; a resumed run purges the events of the epochs it repeats
    (``purge_step``), so its curves have one point per epoch. The writer is closed when the run
    ends, normally or by an error.

    Args:
        log_dir: where the event files go (None: ``<run directory>/tensorboard``; then the run
            needs a run directory, ``out=...``).

    Attributes:
        path: the log directory of the current (or last) run, None before a run starts.
        writer: the open writer while a run is in progress, else None.

    Raises:
        ConfigError: when tensorboard is not installed.

    Example:
        >>> fit(epochs=5, out="runs/a", callbacks=[TensorBoardTracker()])  # doctest: +SKIP
        >>> # then: tensorboard --logdir runs/a/tensorboard
    """

    def __init__(self, log_dir: str | Path | None = None) -> None:
        if log_dir is not None and not isinstance(log_dir, (str, Path)):
            raise ConfigError(f"`log_dir` must be a path or None, got {type(log_dir).__name__}")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._writer_class = load_summary_writer()
        self.path: Path | None = None
        self.writer: SummaryWriter | None = None
        self._step = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.ctx.is_main:
            return
        self._close()  # a tracker reused for a second run starts a new writer
        if self.log_dir is not None:
            path = self.log_dir
        elif trainer.run_dir is not None:
            path = Path(trainer.run_dir) / "tensorboard"
        else:
            raise ConfigError(
                "TensorBoardTracker has nowhere to write: pass log_dir=... or train with a run "
                "directory (out=...)"
            )
        self._step = len(trainer.history)  # epochs already done (a resumed run)
        self.path = path
        self.writer = self._writer_class(log_dir=str(path), purge_step=self._step + 1)

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        if self.writer is None:  # rank > 0, or not started
            return
        for key, value in row.items():
            if key != "epoch" and is_number(value):
                self.writer.add_scalar(key, float(value), global_step=epoch)
        self._step = epoch
        self.writer.flush()

    def on_evaluated(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        scalars = numeric_scalars(metrics)
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=self._step)
        config = flatten(trainer.config)
        hparam_dict = {k: v if is_number(v) else config_text(v) for k, v in config.items()}
        metric_dict = {k: v for k, v in scalars.items() if k.startswith("test_")}
        for summary in hparams(hparam_dict, metric_dict):
            self.writer.file_writer.add_summary(summary, self._step)
        table = "\n".join(f"    {k} = {config_text(v)}" for k, v in config.items())
        self.writer.add_text("config", table, global_step=self._step)
        self.writer.flush()

    def on_figures(self, trainer: Trainer, paths: Sequence[Path]) -> None:
        if self.writer is None:
            return
        from matplotlib.image import imread

        for p in map(Path, paths):
            if p.suffix.lower() != ".png":
                continue
            image = imread(p)  # (H, W, C) floats in [0, 1], or (H, W) for grey
            self.writer.add_image(
                f"figures/{p.stem}",
                image,
                global_step=self._step,
                dataformats="HWC" if image.ndim == 3 else "HW",
            )
        self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
