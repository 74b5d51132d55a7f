r"""Checkpoints: written atomically, the last two kept, loaded with ``weights_only=True``.

A checkpoint holds state dicts (model, optimiser), the epoch, the per-epoch history, the random
number generator states and the config as plain data, so ``torch.load(weights_only=True)``
reads it and no pickle of user code is ever executed.

Writing: ``checkpoint.pt`` is first written to a temporary file in the same directory,
flushed and fsync'd, then the previous ``checkpoint.pt`` becomes ``checkpoint.prev.pt`` and the new
file takes its name (each step an ``os.replace``), so a kill at any moment leaves at least one
complete checkpoint. Loading falls back to the previous checkpoint, with a warning, if the newest is
missing, truncated or corrupted. A kill can leave temporary files (``.NAME.tmpPID``) behind; they
are never read, :func:`is_temporary` recognises them and :func:`remove_temporaries` clears them.

A checkpoint that holds a pickled object other than tensors and plain data is refused with a
one-line :class:`ConfigError`; nothing in it is run.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
#: The best-validation weights of kinds that evaluate them (written as a checkpoint).
BEST = "best.pt"

#: Temporary files of the atomic writes here and in :func:`ppl_vae.config.write_text_atomic`.
_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` is a leftover temporary file of an atomic write (``.NAME.tmpPID``)."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``run_dir``; return their paths."""
    run_dir = Path(run_dir)
    removed = []
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        if p.is_file() and is_temporary(p):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """All random number generator states as tensors and plain Python values."""
    np_state = np.random.get_state()  # noqa: NPY002 - saving the legacy global state
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore the states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002 - restoring the legacy global state
        (
            "MT19937",
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint (the newest or the previous one)."""
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT).exists() or (run_dir / PREVIOUS).exists()


def _write_temporary(path: Path, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` to a temporary file beside ``path``, flushed and fsync'd."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # disk full, a kill: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def save_state_atomic(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    os.replace(_write_temporary(path, state), path)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` as ``run_dir/checkpoint.pt``, keeping the previous one."""
    run_dir = Path(run_dir)
    path = run_dir / CHECKPOINT
    tmp = _write_temporary(path, state)
    if path.exists():
        os.replace(path, run_dir / PREVIOUS)
    os.replace(tmp, path)
    _fsync_dir(run_dir)
    return path


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_state_file(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """One checkpoint-format file (``checkpoint.pt``, ``best.pt``), loaded with
    ``weights_only=True``; every failure is a one-line :class:`ConfigError`."""
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": the file is refused or read all the same
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module
        # ... is blocked" (os.system, eval, ...): code or objects, never a damaged file.
        found = re.search(r"unsupported\s+(?:global:\s+)?GLOBAL\s+(\S+)", text, re.IGNORECASE)
        if found is not None:
            raise ConfigError(
                f"checkpoint {str(path)!r} holds a pickled Python object ({found.group(1)}), not "
                "only tensors and plain data; refused: it holds code or objects that a safe load "
                "(weights_only=True) does not run, and nothing in it was run"
            ) from None
        raise ConfigError(
            f"checkpoint {str(path)!r} is truncated or corrupted "
            f"(UnpicklingError: {_unpickling_detail(text)})"
        ) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ...
        raise ConfigError(
            f"checkpoint {str(path)!r} is truncated or corrupted "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise ConfigError(f"checkpoint {str(path)!r} is not a ppl-vae checkpoint")
    return state


def describe_load_error(e: BaseException) -> str:
    """One line for ``load_state_dict``'s error: its first mismatch and how many more there are."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    details = lines[1:] or lines or [type(e).__name__]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return details[0] + more


def architecture(module: Any) -> str:
    """The module's printout (layers, their sizes and activations): what a checkpoint was
    written by, beyond the parameter shapes its state dict shows."""
    return repr(module)


def load_model_state(module: Any, state: dict[str, Any], where: str) -> None:
    """Load ``state["model"]`` into ``module``, refusing another architecture in one line.

    The state dict's keys and shapes must match, and so must the module printout the checkpoint
    recorded (checkpoints written before it was recorded are checked by shapes alone): a softplus
    network whose weights were saved is never loaded silently into a ReLU one.
    """
    recorded = state.get("architecture")
    if isinstance(recorded, str):
        built = architecture(module)
        if built != recorded:
            diff = next(
                (
                    (i + 1, a.strip(), b.strip())
                    for i, (a, b) in enumerate(zip(recorded.splitlines(), built.splitlines()))
                    if a != b
                ),
                None,
            )
            detail = (
                f"line {diff[0]} of the module printout: checkpoint {diff[1]!r}, now {diff[2]!r}"
                if diff
                else "the module printouts differ in length"
            )
            raise ConfigError(
                f"checkpoint in {where} was written by another architecture than the one its "
                f"config builds now ({detail}); was a component file changed?"
            )
    try:
        module.load_state_dict(state["model"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(
            f"checkpoint in {where} does not match the model its config builds: "
            f"{describe_load_error(e)}"
        ) from None


def _unpickling_detail(text: str) -> str:
    """The cause in torch's weights-only error, without its advice to load unsafely."""
    detail = text.partition("WeightsUnpickler error:")[2].strip()
    if not detail:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        lines = [ln for ln in lines if "weights_only" not in ln and "documentation" not in ln]
        detail = lines[0] if lines else "unreadable pickle"
    return _first_line(detail)


def _first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load_checkpoint(run_dir: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load the newest readable checkpoint of a run (falling back to the previous one)."""
    run_dir = Path(run_dir)
    path, prev = run_dir / CHECKPOINT, run_dir / PREVIOUS
    if not path.exists() and not prev.exists():
        raise ConfigError(f"no checkpoint in {str(run_dir)!r} (expected {CHECKPOINT})")
    try:
        if not path.exists():
            raise ConfigError(f"checkpoint {str(path)!r} is missing")
        return load_state_file(path, map_location)
    except ConfigError as newest_error:
        if not prev.exists():
            raise
        state = load_state_file(prev, map_location)
        warnings.warn(
            f"{newest_error}; using the previous checkpoint {str(prev)!r} (epoch {state['epoch']})",
            RuntimeWarning,
            stacklevel=2,
        )
        return state
