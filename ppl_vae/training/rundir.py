r"""The run directory: creating it safely, the run's config, resuming and the metrics file.

A run directory holds ``config.toml`` (the resolved config, which records the kind),
``history.csv``, ``checkpoint.pt`` (and ``checkpoint.prev.pt``), ``best.pt`` for kinds that
evaluate their best-validation weights, ``metrics.json`` and ``figures/``. These functions are
shared by every command that trains (``fit``, ``ssl``) and knows no kind.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..config import ConfigFile, write_text_atomic
from ..models.errors import ConfigError
from . import checkpoint as ckpt
from . import distributed

__all__ = [
    "FIGURES",
    "LOCK",
    "OUTPUT_FILES",
    "RUN_DIRS",
    "RUN_FILES",
    "config_as_dict",
    "is_run_dir",
    "load_resume_state",
    "prepare_run_dir",
    "resolve_config",
    "run_dir_lock",
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
#: What ``evaluate``, ``sample`` and ``score`` write into a run directory by default: the old
#: run's outputs, removed by ``overwrite`` with it (``fnmatch`` patterns).
OUTPUT_FILES = (
    "evaluation.json",
    "evaluation_scores.csv",
    "samples_n*.npy",
    "samples_n*.png",
)
#: ``ppl-vae score``'s default folders (``score-<data>``) and the files it writes in them.
SCORE_DIRS, SCORE_FILES = "score-*", ("scores.csv", "summary.json", "histograms.png")
#: The figures a run (or ``ppl-vae plot``) writes into ``figures/``; a file of another name
#: there is the user's and stays.
FIGURES = (
    "elbo.png",
    "reconstructions.png",
    "samples.png",
    "latent.png",
    "interpolation.png",
    "traversals_*.png",
    "posterior_*.png",
    "kl_per_dimension.png",
    "confusion.png",
    "confusion_baseline.png",
    "style_content.png",
    "class_samples.png",
    "accuracy.png",
)
#: The trackers' default stores, whole folders the run owns, replaced by ``overwrite``.
RUN_DIRS = ("tensorboard", "mlruns")


#: The lock file of a run directory in use (held with ``fcntl.flock``, removed at release).
LOCK = ".ppl-vae.lock"


@contextlib.contextmanager
def run_dir_lock(out: Path) -> Iterator[None]:
    """Hold the lock of run directory ``out`` (created if missing) while the block runs.

    A second process that asks for it refuses in one line. The kernel releases an
    ``fcntl.flock`` when its holder dies, so a killed run never leaves a stale lock; a directory
    this call created and nothing else filled is removed again.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    created = not out.exists()
    path = out / LOCK
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(out, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(path).st_ino == os.fstat(fd).st_ino  # not a lock file just removed
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise ConfigError(
                f"run directory {str(out)!r} is in use by another ppl-vae process (it holds "
                f"{LOCK}); wait for it to finish or choose another --out"
            )
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        if created:
            try:
                out.rmdir()  # only if empty
            except OSError:
                pass


def _unwritable(out: Path, e: OSError) -> ConfigError:
    return ConfigError(
        f"cannot write the run directory {str(out)!r}: {e.strerror or e}"
        + (" (a folder on the path is a file)" if e.errno == errno.ENOTDIR else "")
        + (f" ({e.filename})" if e.filename and str(e.filename) != str(out) else "")
    )


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory ppl-vae wrote: its ``config.toml`` starts with
    ppl-vae's header or records a ``kind``."""
    config = path / "config.toml"
    try:
        with open(config, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    lines = head.splitlines()
    return bool(lines) and (
        lines[0].startswith("# ppl-vae") or any(re.match(r"kind\s*=", ln) for ln in lines)
    )


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse to touch an existing run unless resuming or overwriting.

    ``overwrite`` removes what ppl-vae wrote there (the run's files, its figures, the outputs of
    ``evaluate``, ``sample`` and ``score`` at their default names, the trackers' stores) and
    leaves every other file as it is; the caller then writes the new ``config.toml``. Leftover temporary files of interrupted atomic writes do not make a directory a run; they
    are removed when a fresh run starts in it.
    """
    try:
        _prepare_run_dir(out, resume, overwrite)
    except OSError as e:
        # A read-only file system, no permission, a parent that is a file: before any training.
        raise _unwritable(out, e) from None


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    existing = out.is_dir() and any(
        not ckpt.is_temporary(p) and p.name != LOCK for p in out.iterdir()
    )
    if resume:
        if not existing:
            raise ConfigError(f"nothing to resume: run directory {str(out)!r} is missing or empty")
        if not (out / "config.toml").is_file():
            raise ConfigError(
                f"nothing to resume: run directory {str(out)!r} has no config.toml (the run "
                "stopped before it wrote one); start it again without --resume"
            )
        _probe_writable(out)
        return
    if existing and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if existing:
        if not is_run_dir(out):
            raise ConfigError(
                f"--overwrite replaces a run directory only, and {str(out)!r} is not a ppl-vae "
                "run directory (no config.toml written by ppl-vae); nothing in it was changed: "
                "choose another --out"
            )
        _probe_writable(out)  # before anything is deleted
        _remove_run(out)
    out.mkdir(parents=True, exist_ok=True)
    _probe_writable(out)
    ckpt.remove_temporaries(out)


def _remove_run(out: Path) -> None:
    """Delete the files and folders a run and its commands wrote in ``out``, and nothing else.

    ``config.toml`` stays, for the new run to replace atomically: a kill at any moment of an
    overwrite leaves a directory that is still a run directory (resumable, or overwritten again),
    never one that only the user's files keep from looking empty.
    """

    def unlink(folder: Path, patterns: tuple[str, ...]) -> None:
        for p in folder.iterdir() if folder.is_dir() else ():
            if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns):
                p.unlink(missing_ok=True)

    unlink(out, tuple(name for name in RUN_FILES if name != "config.toml") + OUTPUT_FILES)
    folders = [out / "figures", *(p for p in out.glob(SCORE_DIRS) if p.is_dir())]
    for folder in folders:
        unlink(folder, FIGURES if folder.name == "figures" else SCORE_FILES)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if nothing of the user's is left in it
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _probe_writable(d: Path) -> None:
    """Raise the ``OSError`` of writing in ``d`` (a read-only file system, no permission)."""
    probe = d / f".ppl-vae-probe.tmp{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


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

        def read_saved_config() -> dict[str, Any]:
            prepare_run_dir(run_dir, resume=True, overwrite=False)
            return cls.load(run_dir / "config.toml").to_dict()

        d = ctx.on_main(read_saved_config)
        # Options equal to the saved ones (the interrupted command re-run with --resume) are
        # accepted; a real change of anything but `epochs` and `device` is refused.
        changed = []
        for k in sorted(options):
            if k in ("epochs", "device"):
                continue
            new = cls.from_dict({**d, k: options[k]}).to_dict().get(k, options[k])
            if new != d.get(k):
                changed.append(f"`{k}` {d.get(k)!r} -> {new!r}")
        if changed:
            raise ConfigError(
                f"resume uses the run's saved config; only `epochs` and `device` may change, "
                f"got {', '.join(changed)} (saved -> given)"
            )
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
