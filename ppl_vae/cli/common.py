r"""What every command shares: the parser with one-line errors, option parsers and the
option groups that more than one command declares (networks, schedules, trackers)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any, NoReturn

from ..models.errors import ConfigError

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "add_network_options",
    "add_schedule_options",
    "add_tracker_option",
    "int_list",
    "key_values",
    "literal",
    "out_path",
    "trackers_from_args",
]

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``ppl-vae fit: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def literal(text: str) -> Any:
    """Parse ``key=value`` option values: JSON literals (numbers, true/false, lists) or strings."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = literal(value)
    return out


def out_path(text: str) -> str:
    """``--out``: a path, never empty (an empty one would silently mean "the default")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory path, got an empty string")
    return text


def int_list(text: str) -> list[int]:
    text = text.strip()
    if not text:
        return []
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of integers (e.g. 256,128), got {text!r}"
        ) from None


def add_network_options(g: Any) -> None:
    """``--encoder``/``--encoder-arg`` and ``--decoder``/``--decoder-arg`` (every command that
    builds networks declares them through this one function)."""
    from ..components import available

    for part, example in (("encoder", "activation=softplus"), ("decoder", "norm=batch")):
        g.add_argument(
            f"--{part}",
            help=f"{part} network: one of {available(part)}, 'file.py:Class' or "
            f"'package.module:Class' (default: the one --network picks)",
        )
        g.add_argument(
            f"--{part}-arg",
            action="append",
            metavar="KEY=VALUE",
            help=f"{part} option, repeatable (e.g. {example}; activation, dropout, norm, ...)",
        )
    g.add_argument(
        "--guide-family",
        help=f"variational family of q(z|x): one of {available('family')} or 'file.py:Class' "
        "(default: the prior's own, e.g. a Normal for the Gaussian prior)",
    )
    g.add_argument(
        "--guide-family-arg",
        action="append",
        metavar="KEY=VALUE",
        help="option of the guide family, repeatable (e.g. num_flows=4 for iaf)",
    )


def add_schedule_options(g: Any) -> None:
    """``--lr-schedule NAME`` and ``--lr-schedule-arg KEY=VALUE`` (fit and ssl)."""
    g.add_argument(
        "--lr-schedule",
        help="learning-rate schedule, a torch.optim.lr_scheduler class stepped once per epoch "
        "(e.g. CosineAnnealingLR, StepLR, ReduceLROnPlateau on the validation metric)",
    )
    g.add_argument(
        "--lr-schedule-arg",
        action="append",
        metavar="KEY=VALUE",
        help="option of the schedule, repeatable (e.g. T_max=50, step_size=10, gamma=0.5)",
    )


def add_tracker_option(p: Any) -> None:
    """``--log SPEC`` (repeatable): experiment trackers as training callbacks."""
    p.add_argument(
        "--log",
        action="append",
        metavar="TRACKER",
        help="log the run to a tracker, repeatable: tensorboard (events in RUN_DIR/tensorboard), "
        "tensorboard:DIR, mlflow (a SQLite store in RUN_DIR/mlruns) or mlflow:URI",
    )


def trackers_from_args(args: argparse.Namespace) -> list[Any]:
    """The callbacks ``--log`` asks for (one-line errors for unknown or missing trackers)."""
    if not getattr(args, "log", None):
        return []
    from ..training.trackers import make_tracker

    return [make_tracker(spec) for spec in args.log]
