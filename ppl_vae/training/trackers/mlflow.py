r"""MLflow tracker: a run's config, history, test metrics and files as one MLflow run.

Everything goes through an :class:`mlflow.tracking.MlflowClient` bound to the tracker's store, not
through MLflow's fluent API: the fluent API would set the process's tracking URI, active experiment
and active run, which would outlive the training run and redirect a user's own ``mlflow`` calls.

What is logged, under the names the run directory already uses:

- params: the resolved config, nested dicts joined with ``/``; strings as they are, other values
  as JSON (``null``, ``[256, 128]``), cut to MLflow's length limit with a trailing ``...`` (the
  whole config is the ``config.toml`` artifact);
- metrics: every numeric column of an epoch's history row except ``epoch`` at step = the epoch
  (counted from 1); every numeric scalar test metric (nested dicts joined with ``/``) at the step
  of the last epoch. Characters MLflow does not allow in a key become ``_``;
- artifacts: the figures (under ``figures/``), and ``config.toml``, ``history.csv`` and, once
  the run has been evaluated, ``metrics.json`` from the run directory;
- tags: ``ppl_vae.kind`` and ``ppl_vae.run_dir``, with MLflow's usual source and user tags.

The run ends ``FINISHED`` when the test metrics were computed and ``FAILED`` otherwise (an error,
or an interruption, before evaluation).

The default store is local and offline: ``sqlite:///<run directory>/mlruns/mlflow.db`` with the
artifacts in ``<run directory>/mlruns/artifacts``; view it with the full ``mlflow`` package as
``mlflow ui --backend-store-uri sqlite:///<run directory>/mlruns/mlflow.db``. (MLflow 3 keeps the
``file:`` store only behind ``MLFLOW_ALLOW_FILE_STORE=true``; SQLite is the local store it
supports.) MLflow's usage telemetry is switched off (``MLFLOW_DISABLE_TELEMETRY=true``) unless the
environment already sets that variable.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...models.errors import ConfigError
from ..callbacks import Callback
from .common import config_text, flatten, is_number, numeric_scalars

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ..trainer import Trainer

__all__ = ["MLflowTracker", "default_store", "mlflow_key"]

INSTALL_HINT = 'pip install "ppl-vae[mlflow]"'

# MLflow's limits (mlflow.utils.validation); a request over them is rejected, not cut.
MAX_PARAM_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PER_BATCH = 100
# Characters allowed in a param or metric key on every platform (no ':', which Windows refuses).
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def load_mlflow() -> None:
    """Import ``mlflow`` with its telemetry off, or raise a :class:`ConfigError` naming the extra."""
    # Read when mlflow is imported and again at every call: set it before the first import.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"the MLflow tracker needs the mlflow package ({e}); install it with: {INSTALL_HINT}"
        ) from None


def default_store(run_dir: Path) -> tuple[str, str]:
    """The local store of a run directory: (tracking URI, artifact location).

    A SQLite database ``run_dir/mlruns/mlflow.db`` and the artifacts beside it in
    ``run_dir/mlruns/artifacts``.
    """
    try:
        import alembic  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"the MLflow tracker's local SQLite store needs sqlalchemy and alembic ({e}); "
            f"install them with: {INSTALL_HINT}, or pass a tracking URI"
        ) from None
    root = Path(run_dir).resolve() / "mlruns"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(root / 'mlflow.db').as_posix()}", (root / "artifacts").as_uri()


def mlflow_key(name: str) -> str:
    """``name`` as a valid MLflow param or metric key: other characters become ``_``.

    Example:
        >>> mlflow_key("per_class_accuracy/T-shirt(top)")
        'per_class_accuracy/T-shirt_top_'
    """
    key = _BAD_KEY_CHARS.sub("_", name)
    key = "/".join(part if part not in ("", ".", "..") else "_" for part in key.split("/"))
    return key[:MAX_KEY_LENGTH]


def param_value(value: Any) -> str:
    """A config value as an MLflow param: text, cut to the length MLflow accepts."""
    text = config_text(value)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - 3] + "..."
    return text


def chunks(items: list[Any], size: int = MAX_PER_BATCH) -> list[list[Any]]:
    """``items`` in lists of at most ``size`` (MLflow's limit on one request)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class MLflowTracker(Callback):
    r"""Log the run as an MLflow run (through :class:`mlflow.tracking.MlflowClient`).

    Only rank 0 logs under ``torchrun``. A resumed run is a new MLflow run whose metrics start at
    the first resumed epoch.

    Args:
        tracking_uri: the MLflow tracking store (``sqlite:///...``, ``http://host:5000``, ...);
            None: a local SQLite store in the run directory (see :func:`default_store`; the run
            then needs a run directory, ``out=...``).
        experiment: the experiment's name, created if missing (in the default store its
            artifacts go to ``<run directory>/mlruns/artifacts``).
        run_name: the MLflow run's name (None: the run directory's name, or one MLflow makes
            up).

    Attributes:
        tracking_uri_used: the store of the current (or last) run, None before a run starts.
        run_id: the MLflow run's id, None before a run starts.

    Raises:
        ConfigError: when mlflow is not installed, or ``experiment`` is empty.

    Example:
        >>> fit(epochs=5, out="runs/a", callbacks=[MLflowTracker()])  # doctest: +SKIP
        >>> # then: mlflow ui --backend-store-uri sqlite:///runs/a/mlruns/mlflow.db
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "ppl-vae",
        run_name: str | None = None,
    ) -> None:
        if tracking_uri is not None and (not isinstance(tracking_uri, str) or not tracking_uri):
            raise ConfigError(
                f"`tracking_uri` must be a non-empty string or None, got {tracking_uri!r}"
            )
        if not isinstance(experiment, str) or not experiment.strip():
            raise ConfigError(f"`experiment` must be a non-empty string, got {experiment!r}")
        if run_name is not None and not isinstance(run_name, str):
            raise ConfigError(f"`run_name` must be a string or None, got {type(run_name).__name__}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        load_mlflow()
        self.tracking_uri_used: str | None = None
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._run_dir: Path | None = None
        self._evaluated = False
        self._step = 0

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.ctx.is_main:
            return
        self._end()  # a tracker reused for a second run starts a new MLflow run
        from mlflow.tracking import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        run_dir = Path(trainer.run_dir) if trainer.run_dir is not None else None
        artifact_location: str | None = None
        if self.tracking_uri is not None:
            uri = self.tracking_uri
        elif run_dir is not None:
            uri, artifact_location = default_store(run_dir)
        else:
            raise ConfigError(
                "MLflowTracker has nowhere to log: pass tracking_uri=... or train with a run "
                "directory (out=...)"
            )
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = client.create_experiment(
                self.experiment, artifact_location=artifact_location
            )
        elif experiment.lifecycle_stage != "active":
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} in {uri!r} is deleted; restore it or "
                "pass another experiment name"
            )
        else:
            experiment_id = experiment.experiment_id
        tags = {"ppl_vae.kind": trainer.kind.name}
        if run_dir is not None:
            tags["ppl_vae.run_dir"] = str(run_dir.resolve())
        run_name = self.run_name or (run_dir.resolve().name if run_dir is not None else None)
        run = client.create_run(experiment_id, tags=resolve_tags(tags), run_name=run_name)
        self._client, self.run_id, self.tracking_uri_used = client, run.info.run_id, uri
        self._run_dir, self._evaluated = run_dir, False
        self._step = len(trainer.history)  # epochs already done (a resumed run)

        from mlflow.entities import Param

        params = [Param(mlflow_key(k), param_value(v)) for k, v in flatten(trainer.config).items()]
        for batch in chunks(params):
            client.log_batch(self.run_id, params=batch)

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        if self._client is None:  # rank > 0, or not started
            return
        values = {k: float(v) for k, v in row.items() if k != "epoch" and is_number(v)}
        self._log_metrics(values, step=epoch)
        self._step = epoch

    def on_evaluated(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self._client is None:
            return
        self._log_metrics(numeric_scalars(metrics), step=self._step)
        self._evaluated = True

    def on_figures(self, trainer: Trainer, paths: Sequence[Path]) -> None:
        if self._client is None:
            return
        for p in paths:
            self._client.log_artifact(self.run_id, str(p), artifact_path="figures")

    def on_train_end(self, trainer: Trainer) -> None:
        self._end()

    # -- helpers -----------------------------------------------------------------------------
    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        assert self._client is not None and self.run_id is not None
        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), v, now, step) for k, v in values.items()]
        for batch in chunks(metrics):
            self._client.log_batch(self.run_id, metrics=batch)

    def _end(self) -> None:
        """Upload the run directory's files and end the MLflow run (once)."""
        client, run_id = self._client, self.run_id
        if client is None or run_id is None:
            return
        self._client = None
        try:
            if self._run_dir is not None:
                names = ["config.toml", "history.csv"]
                if self._evaluated:
                    names.append("metrics.json")
                for name in names:
                    if (self._run_dir / name).is_file():
                        client.log_artifact(run_id, str(self._run_dir / name))
        finally:
            client.set_terminated(run_id, status="FINISHED" if self._evaluated else "FAILED")
