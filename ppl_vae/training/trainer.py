r"""The one training loop: every model kind (VAE, M2, a user's pair) trains here.

The trainer knows no kind by name. It owns what every run shares:

- the optimiser (Adam, fused where available) and gradient clipping;
- the KL weight schedule :math:`\beta_t = \beta f_t` (:mod:`~ppl_vae.training.schedules`: the
  linear warm-up :math:`f_t = \min(1, (t+1) / T_\text{warm-up})`, cyclical, or a user's function)
  and the training progress :math:`t / (T - 1)` (temperatures), handed to the kind before every step as a
  :class:`~ppl_vae.kinds.base.StepState`;
- the non-finite guard: a non-finite loss, or distribution parameters that Pyro's validation
  rejects, stop the run with a :class:`TrainingError` that names the epoch and batch and where the
  last good checkpoint is;
- the progress bar, the per-epoch history and validation, the best-validation weights
  (``best.pt``; ties go to the later epoch);
- atomic checkpoints holding the module, the optimiser, the history, the best weights, every
  random state and the kind's batch order, so that a resumed run continues to exactly the result
  an uninterrupted one gives on CPU;
- DistributedDataParallel under ``torchrun``: the whole step loss is computed inside the wrapped
  module's forward (:mod:`ppl_vae.training.distributed`);
- callbacks (:mod:`ppl_vae.training.callbacks`), the only way anything else hooks into an epoch.
"""

from __future__ import annotations

import errno
import inspect
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..kinds.base import ModelKind, StepState
from ..models.errors import ConfigError
from . import checkpoint as ckpt
from . import distributed
from .callbacks import Callback, CallbackList
from .optim import make_adam
from .schedules import make_beta_schedule

__all__ = ["Settings", "Trainer", "TrainingError", "history_text", "write_history_csv"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass(frozen=True)
class Settings:
    """The optimisation settings every kind shares.

    Attributes:
        epochs: training epochs.
        lr: Adam's learning rate.
        beta: KL weight after the warm-up.
        warmup_epochs: linear warm-up of the KL weight from 0 to ``beta`` (0: none).
        beta_schedule: the KL weight's schedule (:mod:`ppl_vae.training.schedules`):
            ``"linear"`` (the warm-up), ``"cyclical"``, a ``file.py:function`` spec or a
            function ``f(step, total_steps)`` whose value multiplies ``beta``.
        beta_schedule_args: the schedule's options.
        patience: stop when the validation metric has not improved for this many epochs
            (None: train every epoch).
        clip_norm: clip the global gradient norm (None: off; ``inf`` measures without clipping).
        seed: the run's seed (per-epoch noise under several processes).
    """

    epochs: int
    lr: float
    beta: float = 1.0
    warmup_epochs: float = 0.0
    beta_schedule: Any = "linear"
    beta_schedule_args: dict[str, Any] = field(default_factory=dict)
    patience: int | None = None
    clip_norm: float | None = None
    seed: int = 0
    lr_schedule: str | None = None
    lr_schedule_args: dict[str, Any] = field(default_factory=dict)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str | None, args: dict[str, Any]
) -> Any:
    """A :mod:`torch.optim.lr_scheduler` class by name, stepped once per epoch (None: none).

    ``ReduceLROnPlateau`` is stepped with the kind's validation metric, which is larger-is-better,
    so its ``mode`` defaults to ``"max"`` here.
    """
    if name is None:
        return None
    from torch.optim import lr_scheduler

    # Schedules that take functions or other schedulers cannot come from a config file.
    excluded = {"LRScheduler", "ChainedScheduler", "SequentialLR", "LambdaLR", "MultiplicativeLR"}
    choices = sorted(
        n
        for n, c in vars(lr_scheduler).items()
        if inspect.isclass(c)
        and issubclass(c, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))
        and not n.startswith("_")
        and n not in excluded
    )
    cls = getattr(lr_scheduler, name, None) if name in choices else None
    if cls is None:
        raise ConfigError(
            f"Unknown lr_schedule {name!r}; expected a torch.optim.lr_scheduler class, one of "
            f"{choices}"
        )
    kwargs = dict(args)
    if cls is lr_scheduler.ReduceLROnPlateau:
        kwargs.setdefault("mode", "max")
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(k for k in kwargs if k not in params or k in ("self", "optimizer"))
    if unknown:
        accepted = [n for n in params if n not in ("self", "optimizer", "verbose")]
        raise ConfigError(f"lr_schedule {name} has no option(s) {unknown}; it accepts {accepted}")
    try:
        return cls(optimizer, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"lr_schedule {name} with {kwargs}: {e}") from None


def nonfinite_message(what: str, epoch: int, batch: int, steps: int, run_dir: Path | None) -> str:
    """The one-line report of a non-finite step (``epoch`` 0-based, the number done)."""
    where = (
        f"the last good checkpoint (epoch {epoch}) is in {str(run_dir)!r}"
        if run_dir is not None and epoch > 0
        else "no checkpoint was written"
    )
    return (
        f"{what} at epoch {epoch + 1}, batch {batch + 1} of {steps}; {where}. "
        "Try a lower --lr or --clip-norm."
    )


def state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Trainer:
    """Trains one :class:`~ppl_vae.kinds.base.ModelKind`.

    Args:
        kind: the model kind (module, batches, objective, reports).
        settings: optimiser and schedule settings.
        ctx: the process's place in a ``torchrun`` job (a single process by default).
        device: where the module and data live.
        run_dir: the run directory to checkpoint into (None: in memory only).
        config: the run's resolved config as plain data (saved in every checkpoint).
        callbacks: hooks into the run.
        quiet: no progress bar (it is also off when stderr is not a terminal and on ranks > 0).
    """

    def __init__(
        self,
        kind: ModelKind,
        settings: Settings,
        *,
        ctx: distributed.Context | None = None,
        device: torch.device | None = None,
        run_dir: Path | None = None,
        config: dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
        quiet: bool = False,
    ) -> None:
        self.kind = kind
        self.settings = settings
        self.ctx = ctx or distributed.Context()
        self.device = device or torch.device("cpu")
        self.run_dir = run_dir
        self.config = dict(config or {})
        self.callbacks = CallbackList(callbacks or [])
        self.quiet = quiet
        self.module = kind.module
        self.beta_schedule = make_beta_schedule(
            settings.beta_schedule, settings.beta_schedule_args, settings.warmup_epochs
        )
        self.stopped_early = False
        self.optimizer = make_adam(self.module.parameters(), lr=settings.lr)
        self.lr_scheduler = make_lr_scheduler(
            self.optimizer, settings.lr_schedule, settings.lr_schedule_args
        )
        # Alone: the kind's loss itself. Under torchrun: a DDP module whose forward computes it.
        self.step_loss = self.ctx.wrap(self.module, kind.loss, self.device)
        self.history: list[dict[str, float]] = []
        self.start_epoch = 0
        self._checkpointed_epoch = 0
        self.best_epoch = 0
        self.best_value = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = (
            state_copy(self.module) if kind.restore_best else None
        )

    # -- checkpoints -------------------------------------------------------------------------
    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint_state`."""
        ckpt.load_model_state(self.module, state, repr(str(self.run_dir)))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.kind.restore_best:
                self.best_state = {k: v.to(self.device) for k, v in state["best_model"].items()}
            self.kind.load_batch_state(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(
                f"checkpoint in {str(self.run_dir)!r} does not match the model its config "
                f"builds: {ckpt.describe_load_error(e)}"
            ) from None
        if self.lr_scheduler is not None:
            if "lr_scheduler" not in state:
                raise ConfigError(
                    f"checkpoint in {str(self.run_dir)!r} has no learning-rate schedule state, "
                    "but the run's config sets lr_schedule"
                )
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        ckpt.set_rng_state(state["rng"], self.kind.shuffle)
        self.history = [dict(h) for h in state["history"]]
        self.start_epoch = self._checkpointed_epoch = int(state["epoch"])
        if "best_epoch" in state:
            self.best_epoch = int(state["best_epoch"])
            self.best_value = float(state[f"best_{self.kind.monitor}"])

    def checkpoint_state(self, epoch: int) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain data."""
        state: dict[str, Any] = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "history": self.history,
            "rng": ckpt.rng_state(self.kind.shuffle),
            **self.kind.batch_state(),
            "config": self.config,
            "kind": self.kind.name,
            "architecture": ckpt.architecture(self.module),
            "best_epoch": self.best_epoch,
            f"best_{self.kind.monitor}": self.best_value,
        }
        if self.best_state is not None:
            state["best_model"] = self.best_state
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()
        return state

    def _write_epoch(self, epoch: int, improved: bool) -> None:
        assert self.run_dir is not None
        try:
            self._write_epoch_files(epoch, improved)
        except (OSError, RuntimeError) as e:
            # torch.save reports a full disk as OSError or as "[enforce fail at
            # inline_container.cc] unexpected pos" / "PytorchStreamWriter failed writing".
            text = str(e)
            if isinstance(e, RuntimeError) and not any(
                s in text for s in ("inline_container", "PytorchStreamWriter", "unexpected pos")
            ):
                raise
            full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or isinstance(
                e, RuntimeError
            )
            good = self._checkpointed_epoch  # epoch's own, if only history.csv failed
            last = (
                f"the last good checkpoint is epoch {good}"
                if good > 0
                else "no checkpoint was written yet"
            )
            cause = "disk full" if full else f"{getattr(e, 'strerror', None) or e}"
            raise TrainingError(
                f"{cause} writing checkpoint at epoch {epoch} in {str(self.run_dir)!r}; {last}; "
                "free space and continue with --resume"
            ) from None

    def _write_epoch_files(self, epoch: int, improved: bool) -> None:
        assert self.run_dir is not None
        state = self.checkpoint_state(epoch)
        # best.pt first: a kill between the two writes replays this epoch on resume, which
        # writes the same best.pt again.
        if improved and self.best_state is not None:
            ckpt.save_state_atomic(self.run_dir / ckpt.BEST, state)
        ckpt.save_checkpoint(self.run_dir, state)
        self._checkpointed_epoch = epoch
        write_history_csv(self.run_dir / "history.csv", self.history)

    # -- the loop ----------------------------------------------------------------------------
    def beta(self, step: int, steps_per_epoch: int, total_steps: int | None = None) -> float:
        """The KL weight of ``step``: ``beta`` times the schedule's factor."""
        total = self.settings.epochs * steps_per_epoch if total_steps is None else total_steps
        return self.settings.beta * self.beta_schedule(step, steps_per_epoch, total)

    def _patience_spent(self) -> bool:
        """No improvement of the monitored metric for ``patience`` epochs (early stopping)."""
        p = self.settings.patience
        return p is not None and len(self.history) - self.best_epoch >= p

    def run(self, figures: bool = True) -> dict[str, Any]:
        """Train (:meth:`fit`), then evaluate and write (:meth:`evaluate_and_write`)."""
        try:
            self.fit()
            return self.evaluate_and_write(figures)
        finally:
            self.callbacks.on_train_end(self)

    def evaluate_and_write(self, figures: bool = True) -> dict[str, Any]:
        """Rank 0 computes the test metrics and writes ``metrics.json``, the kind's outputs and
        figures; every rank returns the metrics."""
        from .rundir import write_metrics

        def on_main() -> dict[str, Any]:
            train_seconds = sum(h["seconds"] for h in self.history)
            metrics = self.kind.evaluate(self.history, train_seconds)
            bad = {
                k: v
                for k, v in metrics.items()
                if k.startswith("test_")
                and not k.endswith("_se")  # one test point: no standard error, by design
                and isinstance(v, float)
                and not math.isfinite(v)
            }
            if bad:
                where = (
                    f"the last checkpoint (epoch {len(self.history)}) is in {str(self.run_dir)!r}"
                    if self.run_dir is not None
                    else "nothing was written"
                )
                raise TrainingError(
                    f"non-finite test metrics {bad} after {len(self.history)} epochs; {where}. "
                    "Try a lower --lr or --clip-norm."
                )
            if self.ctx.enabled:
                metrics["processes"] = self.ctx.world_size
            if self.settings.patience is not None:
                metrics["patience"] = self.settings.patience
                metrics["stopped_early"] = self.stopped_early
            self.callbacks.on_evaluated(self, metrics)
            if self.run_dir is not None:
                self.kind.write_outputs(self.run_dir, metrics)
                write_metrics(self.run_dir, metrics)
                if figures:
                    try:
                        paths = list(self.kind.figures(self.run_dir, metrics, self.history))
                    except Exception as e:  # a figure never fails or loses a finished run
                        metrics["figures_error"] = f"{type(e).__name__}: {e}"
                        write_metrics(self.run_dir, metrics)
                        warnings.warn(
                            f"writing the figures failed ({type(e).__name__}: {e}); the run's "
                            "checkpoint, history and metrics are complete",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    else:
                        metrics["figures"] = [Path(p).name for p in paths]
                        write_metrics(self.run_dir, metrics)
                        self.callbacks.on_figures(self, paths)
            return metrics

        return self.ctx.on_main(on_main)

    def fit(self) -> list[dict[str, float]]:
        """Train from :attr:`start_epoch` to ``settings.epochs``; return the history."""
        kind, ctx, s = self.kind, self.ctx, self.settings
        steps = kind.steps_per_epoch()
        total_steps = s.epochs * steps
        bar = tqdm(
            total=total_steps,
            initial=self.start_epoch * steps,
            disable=self.quiet or not sys.stderr.isatty() or not ctx.is_main,
            desc=kind.progress_label,
            unit="step",
            dynamic_ncols=True,
        )
        self.module.train()
        self.callbacks.on_train_start(self)
        try:
            for epoch in range(self.start_epoch, s.epochs):
                if self._patience_spent():  # also on resume: the same epoch stops either way
                    self.stopped_early = True
                    break
                ctx.seed_epoch(s.seed, epoch)
                t0 = time.perf_counter()
                kind.start_epoch(epoch, self.device)
                sums = torch.zeros(1 + len(kind.part_names), device=self.device)
                for b in range(steps):
                    step = epoch * steps + b
                    kind.begin_step(
                        StepState(
                            epoch=epoch,
                            step=step,
                            total_steps=total_steps,
                            progress=step / max(1, total_steps - 1),
                            beta=self.beta(step, steps, total_steps),
                        )
                    )
                    sums = sums + self._step(kind.batch(b, ctx.shard), epoch, b, steps)
                    bar.update(1)
                kind.end_steps()
                row: dict[str, float] = {"epoch": float(epoch + 1)}
                row.update(kind.train_columns(sums, steps))
                row.update(self._validate(epoch, steps))
                row.update(kind.schedule_columns())
                if self.lr_scheduler is not None:
                    row["lr"] = float(self.optimizer.param_groups[0]["lr"])
                row["seconds"] = time.perf_counter() - t0
                # Every batch loss can be finite while their sum (or the validation) is not.
                # (A part with no data, e.g. M2's unlabelled loss with every label known, is NaN
                # by design: the loss and the monitored metric are what must be finite.)
                keys = (list(row)[1], kind.monitor)
                bad = {k: row[k] for k in dict.fromkeys(keys) if not math.isfinite(row[k])}
                if bad:
                    raise TrainingError(
                        nonfinite_message(
                            f"non-finite epoch results {bad}", epoch, steps - 1, steps, self.run_dir
                        )
                    )
                self.history.append(row)
                value = row[kind.monitor]
                self._step_lr_schedule(value)
                improved = value >= self.best_value
                if improved:
                    self.best_epoch, self.best_value = epoch + 1, value
                    if kind.restore_best:
                        self.best_state = state_copy(self.module)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in (list(row)[1], kind.monitor)})
                self.callbacks.on_epoch_end(self, epoch + 1, row)
                if self.run_dir is not None:
                    # Rank 0 writes; the other ranks wait for it (on_main is a barrier).
                    ctx.on_main(lambda e=epoch + 1, i=improved: self._write_epoch(e, i))
        finally:
            bar.close()
        if kind.restore_best and self.best_state is not None:
            self.module.load_state_dict(self.best_state)
        ctx.dump(self.module)
        return self.history

    def _step_lr_schedule(self, monitor: float) -> None:
        """One step of the learning-rate schedule at the end of an epoch."""
        from torch.optim.lr_scheduler import ReduceLROnPlateau

        if self.lr_scheduler is None:
            return
        if isinstance(self.lr_scheduler, ReduceLROnPlateau):
            self.lr_scheduler.step(monitor)
        else:
            self.lr_scheduler.step()

    def _validate(self, epoch: int, steps: int) -> dict[str, float]:
        """The kind's validation metrics (rank 0 computes, every rank receives them)."""
        try:
            return self.ctx.on_main(self.kind.validate)
        except ValueError as e:
            # The last step left parameters that the validation pass's distributions reject.
            if "invalid values" not in str(e):
                raise
            raise TrainingError(
                nonfinite_message(
                    "non-finite distribution parameters after the last step, in validation",
                    epoch,
                    steps - 1,
                    steps,
                    self.run_dir,
                )
                + f" ({str(e).splitlines()[0]})"
            ) from None

    def _step(self, batch: tuple[Any, ...], epoch: int, b: int, steps: int) -> torch.Tensor:
        """One optimiser step; returns the global batch's ``[loss, *parts]`` (detached)."""
        ctx = self.ctx
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self.step_loss(*batch)
        except ValueError as e:
            text = str(e)
            if "Expected value argument" in text:
                # The data, not the parameters: a value outside a site's support.
                site = text.splitlines()[0].rstrip(":")
                detail = next(ln for ln in text.splitlines() if "Expected value argument" in ln)
                raise ConfigError(
                    f"{site}: the data are outside the support of the model's distribution "
                    f"({detail.strip()[:160]}); binarise them (--binarize dynamic or static) or "
                    "choose a likelihood for this data"
                ) from None
            # Distribution validation rejects NaN/inf parameters before the loss is formed:
            # the same fault as a non-finite loss, reported the same way.
            if "invalid values" not in text:
                raise
            raise TrainingError(
                nonfinite_message(
                    "non-finite distribution parameters", epoch, b, steps, self.run_dir
                )
                + f" ({str(e).splitlines()[0]})"
            ) from None
        # (loss, parts) of the global batch, summed over the shards
        if self.kind.part_names:
            value = ctx.loss_value(
                torch.cat([loss.detach().reshape(1), self.kind.parts.to(loss) * ctx.world_size])
            )
        else:  # the loss alone: no concatenation on the hot path
            value = ctx.loss_value(loss.detach()).reshape(1)
        if not bool(torch.isfinite(value[0])):
            raise TrainingError(
                nonfinite_message(
                    f"non-finite loss ({float(value[0])})", epoch, b, steps, self.run_dir
                )
            )
        loss.backward()
        if self.settings.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.clip_norm)
        self.optimizer.step()
        return value


def history_text(history: list[dict[str, float]]) -> str:
    """The per-epoch history as CSV text (empty for no epochs)."""
    if not history:
        return ""
    cols = list(history[0])
    lines = [",".join(cols)]
    for h in history:
        lines.append(",".join(f"{h[c]:.6g}" if c != "epoch" else str(int(h[c])) for c in cols))
    return "\n".join(lines) + "\n"


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    """Write ``history`` to ``path`` atomically (nothing for no epochs)."""
    from ..config import write_text_atomic

    if not history:
        return
    write_text_atomic(path, history_text(history))
