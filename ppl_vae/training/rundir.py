r"""The run directory: creating it safely, the run's config, resuming and the metrics file.

A run directory holds ``config.toml`` (the resolved config, which records the kind),
``history.csv``, ``checkpoint.pt`` (and ``checkpoint.prev.pt``), ``best.pt`` for kinds that
evaluate their best-validation weights, ``metrics.json`` and ``figures/``. These functions are
shared by every command that trains (``fit``, ``ssl``) and knows no kind.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, TypeVar

from ..config import ConfigFile, write_text_atomic
from ..models.errors import ConfigError
from . import checkpoint as ckpt
from . import distributed

__all__ = [
    "RUN_DIRS",
    "RUN_FILES",
    "config_as_dict",
    "load_resume_state",
    "prepare_run_dir",
    "resolve_config",
    "write_metrics",
]

RUN_FILES = (
    "config.toml",
    "metrics.json",
    "history.csv",
    "scores.csv",
    ckpt.CHECKPOINT,
    ckpt.PREVIOUS,
    ckpt.BEST,
)
#: Folders a run writes (figures, and the trackers' default stores), replaced by ``overwrite``.
RUN_DIRS = ("figures", "tensorboard", "mlruns")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse to touch an existing run unless resuming or overwriting.

    Leftover temporary files of interrupted atomic writes do not make a directory a run; they
    are removed when a fresh run starts in it.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    existing = out.is_dir() and any(not ckpt.is_temporary(p) for p in out.iterdir())
    if resume:
        if not existing:
            raise ConfigError(f"nothing to resume: run directory {str(out)!r} is missing or empty")
        if not (out / "config.toml").is_file():
            raise ConfigError(
                f"nothing to resume: run directory {str(out)!r} has no config.toml (the run "
                "stopped before it wrote one); start it again without --resume"
            )
        return
    if existing and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if existing:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.remove_temporaries(out)


C = TypeVar("C", bound=ConfigFile)


def resolve_config(
    cls: type[C],
    ctx: distributed.Context,
    config: Any,
    options: dict[str, Any],
    run_dir: Path | None,
    resume: bool,
) -> C:
    """The run's config: ``config`` (a ``cls``, a dict or None) updated by ``options``.

    With ``resume`` it is the saved ``run_dir/config.toml`` (read by rank 0 and sent to every
    rank), of which only ``epochs`` and ``device`` may be changed by ``options``.
    """
    if resume:
        if run_dir is None:
            raise ConfigError("resume=True needs the run directory `out`")
        extra = sorted(k for k in options if k not in ("epochs", "device"))
        if extra:
            raise ConfigError(
                f"resume uses the run's saved config; only `epochs` and `device` may change, "
                f"got {extra}"
            )

        def read_saved_config() -> dict[str, Any]:
            prepare_run_dir(run_dir, resume=True, overwrite=False)
            return cls.load(run_dir / "config.toml").to_dict()

        d = ctx.on_main(read_saved_config)
    else:
        d = config_as_dict(cls, config)
    d.update(options)
    return cls.from_dict(d)


def config_as_dict(cls: type[ConfigFile], config: Any) -> dict[str, Any]:
    """``config`` (a ``cls`` instance, a dict or None) as a new dict of its fields."""
    if isinstance(config, cls):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    if config is None:
        return {}
    raise ConfigError(
        f"`config` must be a {cls.__name__}, a dict or None, got {type(config).__name__}"
    )


def load_resume_state(
    run_dir: Path, epochs: int, map_location: Any, stacklevel: int
) -> dict[str, Any] | None:
    """The newest good checkpoint of a run being resumed, or None (with a warning) if it has none.

    Raises if ``epochs`` is below the epochs the checkpoint has done. ``stacklevel`` is that of
    the warning, counted from this function.
    """
    if not ckpt.has_checkpoint(run_dir):
        warnings.warn(
            f"no checkpoint in {str(run_dir)!r} yet (the run stopped in its first epoch); "
            "training starts again from epoch 0 with the run's saved config",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return None
    state = ckpt.load_checkpoint(run_dir, map_location=map_location)
    done = int(state["epoch"])
    if epochs < done:
        raise ConfigError(
            f"`epochs` must be at least the {done} epochs this run has trained when "
            f"resuming, got {epochs}"
        )
    return state


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
