r"""The model-kind contract: what the one trainer needs from any Pyro model/guide pair.

A *kind* is the training recipe around a :class:`~pyro.nn.PyroModule` (:attr:`ModelKind.module`)
whose ``model`` and ``guide`` are ordinary Pyro programs under ``pyro.plate("data")``. The module
stays a plain Pyro pair (``pyro.infer.SVI``, ``Predictive`` and poutine handlers work on it); the
kind adds what training and reporting need:

- **batches**: :meth:`~ModelKind.start_epoch` draws the epoch's order from the kind's own
  generator, :meth:`~ModelKind.batch` returns step ``b``'s arguments of the loss (this process's
  shard of the global batch: a VAE sees one batch, M2 a labelled and an unlabelled one);
- **objective**: :meth:`~ModelKind.loss` is the step loss built from Pyro ELBOs, a sum over
  this shard's share of the global batch (so the shards' losses add up to the single-process
  loss); :attr:`~ModelKind.parts` holds its named terms for the history;
- **schedules**: :meth:`~ModelKind.begin_step` receives the trainer's :class:`StepState` (KL
  weight, training progress) before every step; nothing is set on the kind behind its back;
- **reports**: :meth:`~ModelKind.validate` (the metric named :attr:`~ModelKind.monitor` picks
  ``best.pt``), :meth:`~ModelKind.evaluate` (test metrics) and :meth:`~ModelKind.figures`.

The kind's batch generators are part of the checkpoint (:meth:`~ModelKind.batch_state`), so a
resumed run draws exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["ModelKind", "StepState"]


@dataclass(frozen=True)
class StepState:
    r"""What the trainer's schedules say for one step.

    Attributes:
        epoch: 0-based epoch.
        step: 0-based global step.
        total_steps: steps of the whole run.
        progress: :math:`t / (T - 1)` in [0, 1] (temperature annealing).
        beta: the KL weight :math:`\beta \cdot \min(1, (t+1) / T_\text{warm-up})`.
    """

    epoch: int
    step: int
    total_steps: int
    progress: float
    beta: float


class ModelKind:
    """Base class of the model kinds (see the module docstring).

    Attributes:
        module: the trained :class:`~pyro.nn.PyroModule` (its parameters are what Adam steps).
        shuffle: the generator of the epoch order, saved in every checkpoint.
    """

    #: Name recorded in the run directory's metrics (``"vae"``, ``"m2"``, ...).
    name: ClassVar[str] = "kind"
    #: The validation metric that chooses ``best.pt`` (larger is better).
    monitor: ClassVar[str] = "val_elbo"
    #: Evaluate the best-validation weights (True) or the last epoch's (False).
    restore_best: ClassVar[bool] = False
    #: Names of the terms in :attr:`parts`.
    part_names: ClassVar[tuple[str, ...]] = ()
    #: Label of the progress bar.
    progress_label: ClassVar[str] = "fit"
    #: Progress bars in :meth:`evaluate` and :meth:`figures` (the run is not ``quiet``; they
    #: show on a terminal only, after 2 s); whoever builds the kind sets it.
    progress: bool = False

    module: nn.Module
    shuffle: torch.Generator

    @property
    def step_paths(self) -> dict[str, int] | None:
        """How many loss evaluations each implementation computed so far, ``{"fast": n,
        "pyro": m}``, for a kind whose loss has a fused fast path beside Pyro's ELBO (a loss of
        several terms adds ``"pyro_terms"``: how many of them the fast path does not serve);
        None where it has one implementation."""
        return None

    def __init__(self, module: nn.Module, seed: int) -> None:
        self.module = module
        self.shuffle = torch.Generator().manual_seed(seed)
        self.parts = torch.zeros(len(self.part_names))
        self._annealed = [
            m for m in module.modules() if m is not module and callable(getattr(m, "anneal", None))
        ]

    # -- batches -----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def start_epoch(self, epoch: int, device: torch.device) -> None:
        """Draw epoch ``epoch``'s order from :attr:`shuffle` (every rank draws the same)."""
        raise NotImplementedError

    def batch(self, b: int, shard: Any) -> tuple[Any, ...]:
        """The loss's arguments for step ``b`` of the epoch; ``shard(index)`` is this rank's part."""
        raise NotImplementedError

    def batch_state(self) -> dict[str, Any]:
        """Extra checkpoint entries that restore the batch order (beyond :attr:`shuffle`)."""
        return {}

    def load_batch_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`batch_state` saved (``state`` is the whole checkpoint)."""

    # -- the objective -----------------------------------------------------------------------
    def begin_step(self, s: StepState) -> None:
        """Apply the schedules for the coming step (default: anneal temperatures)."""
        for m in self._annealed:
            m.anneal(s.progress)

    def end_steps(self) -> None:
        """After the epoch's last step: back to the unscaled model for validation."""

    def loss(self, *batch: Any) -> torch.Tensor:
        """The step loss of this shard (see the module docstring); sets :attr:`parts`."""
        raise NotImplementedError

    def train_columns(self, sums: torch.Tensor, steps: int) -> dict[str, float]:
        """History columns from the epoch's sums of ``[loss, *parts]`` over ``steps`` steps."""
        raise NotImplementedError

    def schedule_columns(self) -> dict[str, float]:
        """History columns of the schedules in force at the epoch's end (KL weight, ...)."""
        return {}

    # -- reports -----------------------------------------------------------------------------
    def diagnostic_batch(self, max_points: int) -> Any:
        """The validation data ``model(x)``/``guide(x)`` take, at most ``max_points`` of them,
        for the latent diagnostics (:mod:`ppl_vae.training.diagnostics`); None: none."""
        val = getattr(self, "val_x", None)
        return None if val is None or len(val) == 0 else val[:max_points]

    def validate(self) -> dict[str, float]:
        """Validation metrics, including :attr:`monitor` (run on rank 0 only)."""
        raise NotImplementedError

    def evaluate(self, history: list[dict[str, float]], train_seconds: float) -> dict[str, Any]:
        """Test metrics of the trained module (rank 0 only)."""
        raise NotImplementedError

    def figures(
        self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, float]]
    ) -> Sequence[Path]:
        """Write the kind's figures into ``run_dir/figures``; return their paths."""
        return []

    def write_outputs(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """Files besides ``metrics.json`` the kind writes after evaluation (e.g. scores)."""
