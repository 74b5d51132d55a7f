r"""Experiment trackers: callbacks that log a run to TensorBoard or MLflow.

Both are ordinary :class:`~ppl_vae.training.Callback` instances, so they work for every model
kind (``fit``, ``fit_ssl``, a user's pair) and log on rank 0 only under ``torchrun``. Their
libraries are optional and imported when a tracker is made, never by ``import ppl_vae``:

- :class:`TensorBoardTracker` needs ``pip install "ppl-vae[tensorboard]"``;
- :class:`MLflowTracker` needs ``pip install "ppl-vae[mlflow]"``.

Example:
    >>> from ppl_vae.training.trackers import make_tracker
    >>> fit(epochs=5, out="runs/a", callbacks=[make_tracker("tensorboard")])  # doctest: +SKIP
"""

from __future__ import annotations

from ...models.errors import ConfigError
from ..callbacks import Callback
from .mlflow import MLflowTracker
from .tensorboard import TensorBoardTracker

__all__ = ["TRACKER_SPECS", "MLflowTracker", "TensorBoardTracker", "make_tracker"]

#: The forms :func:`make_tracker` accepts.
TRACKER_SPECS = ("mlflow", "mlflow:URI", "tensorboard", "tensorboard:DIR")


def make_tracker(spec: str) -> Callback:
    """A tracker from its short form (what a command line passes).

    Args:
        spec: ``"tensorboard"`` (events in ``<run directory>/tensorboard``),
            ``"tensorboard:DIR"``, ``"mlflow"`` (a SQLite store in ``<run directory>/mlruns``)
            or ``"mlflow:URI"`` (any MLflow tracking URI, e.g. ``mlflow:sqlite:///runs.db``).

    Returns:
        A :class:`TensorBoardTracker` or :class:`MLflowTracker`.

    Raises:
        ConfigError: for an unknown name, an empty ``DIR``/``URI``, or a tracker whose package is
            not installed (the message names the pip extra).

    Example:
        >>> make_tracker("tensorbaord")
        Traceback (most recent call last):
        ...
        ppl_vae.models.errors.ConfigError: Unknown tracker 'tensorbaord'; expected one of ['mlflow', 'mlflow:URI', 'tensorboard', 'tensorboard:DIR']
    """
    if not isinstance(spec, str):
        raise ConfigError(f"a tracker must be given as a string, got {type(spec).__name__}")
    name, colon, arg = spec.strip().partition(":")
    if name not in ("mlflow", "tensorboard"):
        raise ConfigError(f"Unknown tracker {name!r}; expected one of {list(TRACKER_SPECS)}")
    if colon and not arg:
        what = "URI" if name == "mlflow" else "DIR"
        raise ConfigError(f"tracker {spec!r} has nothing after ':'; expected {name}:{what}")
    if name == "tensorboard":
        return TensorBoardTracker(arg or None)
    return MLflowTracker(tracking_uri=arg or None)
