r"""What every command shares: the parser with one-line errors, option parsers and the
option groups that more than one command declares (networks, schedules, trackers)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
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


def name_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``choices``, in the order given
    (for scripts' options such as ``--models vae,hierarchical``)."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated names from {allowed}, got {text!r}"
            )
        return names

    return parse


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
    """``--lr-schedule NAME``, ``--lr-schedule-arg KEY=VALUE`` and ``--patience N`` (fit and
    ssl)."""
    g.add_argument(
        "--patience",
        type=int,
        help="stop when the validation metric has not improved for this many epochs; the best "
        "epoch's weights are evaluated either way (default: train every epoch)",
    )
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


# -- the options every kind shares, declared once -------------------------------------------------
def add_run_options(
    p: argparse.ArgumentParser, d: Any, help: dict[str, str] | None = None
) -> dict[str, Any]:
    """Declare the flags of the fields every run config shares (:class:`~ppl_vae.config.RunConfig`:
    data, components, networks, optimisation, device, seed) on ``p``, with ``d``'s defaults.

    ``help`` replaces the help of a flag by its field name where a command means something of
    its own by it (e.g. ``epochs``: passes over the unlabelled data for M2). Returns the option
    groups ``{"data", "model", "optimisation", "execution"}`` for the command's own flags.
    """
    h = dict(help or {})

    def text(name: str, default: str) -> str:
        return h.pop(name, default)

    groups: dict[str, Any] = {}
    g = groups["data"] = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help=text(
            "data",
            f"'digits', 'mnist', 'fashion-mnist', 'svhn' or a .npy/.npz file (default {d.data})",
        ),
    )
    g.add_argument(
        "--test-data",
        help="a fixed test file (.npy/.npz; labels as y in a .npz) instead of a test split "
        "(default: split off the data by --data-seed)",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        help="seed of the data split (and of M2's labelled subset), independent of --seed "
        "(default: --seed)",
    )
    g.add_argument(
        "--data-root",
        help="where torchvision data sets live (default $PPL_VAE_DATA or ~/.cache/ppl_vae)",
    )
    g.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="allow downloading mnist/fashion-mnist/svhn (needs internet)",
    )
    g.add_argument(
        "--binarize",
        choices=("auto", "none", "static", "dynamic"),
        help=text(
            "binarize",
            f"binarise pixels (default {d.binarize}: dynamic when the likelihood needs binary data)",
        ),
    )
    g.add_argument("--max-train", type=int, help="use at most this many training points")
    g.add_argument(
        "--val-fraction",
        type=float,
        help=f"share of the training data held out for validation (default {d.val_fraction})",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        help=f"share of the data held out for testing when the data set has no test split of "
        f"its own (default {d.test_fraction})",
    )
    g = groups["model"] = p.add_argument_group("model")
    g.add_argument(
        "--prior",
        help=text(
            "prior",
            f"prior of z: name, 'file.py:Class' or 'package.module:Class' (default {d.prior}); "
            "a file is imported, i.e. its code runs",
        ),
    )
    g.add_argument(
        "--prior-arg",
        action="append",
        metavar="KEY=VALUE",
        help="prior option, repeatable (e.g. concentration=2.0)",
    )
    g.add_argument(
        "--likelihood",
        help=text("likelihood", f"likelihood name or 'file.py:Class' (default {d.likelihood})"),
    )
    g.add_argument(
        "--likelihood-arg",
        action="append",
        metavar="KEY=VALUE",
        help="likelihood option, repeatable (e.g. scale=fixed)",
    )
    g.add_argument("--latent-dim", type=int, help=f"dimensions of z (default {d.latent_dim})")
    g.add_argument(
        "--hidden-dims",
        type=int_list,
        help=text(
            "hidden_dims",
            "hidden widths, comma list; empty gives linear maps (default "
            f"{','.join(map(str, d.hidden_dims))})",
        ),
    )
    g.add_argument(
        "--network",
        choices=("auto", "mlp", "conv"),
        help=text(
            "network", f"network type (default {d.network}: conv for images of 16x16 and more)"
        ),
    )
    add_network_options(g)
    g = groups["optimisation"] = p.add_argument_group("objective and optimisation")
    g.add_argument(
        "--num-particles", type=int, help=f"particles per step (default {d.num_particles})"
    )
    g.add_argument(
        "--epochs", type=int, help=text("epochs", f"training epochs (default {d.epochs})")
    )
    g.add_argument(
        "--batch-size",
        type=int,
        help=text("batch_size", f"mini-batch size (default {d.batch_size})"),
    )
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--clip-norm", type=float, help="clip the gradient norm (default off)")
    add_schedule_options(g)
    g = groups["execution"] = p.add_argument_group("evaluation and execution")
    g.add_argument(
        "--latent-diagnostics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-epoch KL per dimension, reconstruction term and active units on the "
        "validation split (default on)",
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="device (default auto: cuda if available)"
    )
    g.add_argument("--seed", type=int, help=text("seed", f"random seed (default {d.seed})"))
    if h:
        raise ValueError(f"help given for flags that add_run_options does not declare: {sorted(h)}")
    return groups


def run_config_from_args(args: argparse.Namespace, cfg_cls: type) -> dict[str, Any]:
    """The fields of ``cfg_cls`` given on the command line (``None`` means: not given); a field
    ``NAME_args`` comes from the repeatable ``--NAME-arg KEY=VALUE``."""
    from dataclasses import fields

    given: dict[str, Any] = {}
    for f in fields(cfg_cls):
        if f.name.endswith("_args"):
            stem = f.name.removesuffix("_args")
            items = getattr(args, f"{stem}_arg", None)
            if items:
                given[f.name] = key_values(items, f"--{stem.replace('_', '-')}-arg")
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = v
    return given
