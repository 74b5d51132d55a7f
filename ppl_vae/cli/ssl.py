r"""``ppl-vae ssl``: the semi-supervised M2 experiment from the command line.

``ppl-vae ssl --data svhn --labels 1000 --download`` trains the M2 model on SVHN with 1,000
class-balanced labels and writes a run directory (see :func:`ppl_vae.ssl.fit_ssl`); every option
has a default, so ``ppl-vae ssl`` alone runs on the built-in digits.

:func:`register` adds the subcommand to the ``ppl-vae`` parser.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from ..config import ALPHA_PER_DIMENSION
from ..models.errors import ConfigError
from .common import (
    add_run_options,
    add_tracker_option,
    out_path,
    run_config_from_args,
    trackers_from_args,
)


def _labels(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of labelled examples or 'all', got {text!r}"
        ) from None


def _alpha(text: str) -> float | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a weight (a number >= 0) or 'auto', got {text!r}"
        ) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of numbers (e.g. 0.5,0.5), got {text!r}"
        ) from None


def register(subparsers: Any) -> None:
    """Add the ``ssl`` subcommand to ``ppl-vae``'s subparsers."""
    from ..ssl import SSLConfig

    d = SSLConfig()
    p = subparsers.add_parser(
        "ssl",
        help="semi-supervised VAE (M2): train with few labels, report test accuracy",
        description=(
            "Train Kingma et al.'s M2 semi-supervised VAE with a class-balanced labelled subset "
            "and write a run directory (metrics.json with test_accuracy, figures). Every option "
            "has a default (digits, 100 labels, exact enumeration over classes)."
        ),
    )
    p.add_argument("--config", help="a config.toml/.json to start from (flags override it)")
    groups = add_run_options(
        p,
        d,
        help={
            "data": "'digits', 'mnist', 'fashion-mnist', 'svhn' or a .npz with labels "
            f"(default {d.data})",
            "binarize": f"binarise pixels (default {d.binarize})",
            "likelihood": f"likelihood name or 'file.py:Class' (default {d.likelihood}: "
            "discretized-logistic for 8-bit/quantised data)",
            "hidden_dims": "hidden widths of encoder, decoder and classifier, comma list "
            "(default 256,128)",
            "network": f"network type (default {d.network}: the MLP for one-channel images of "
            "at most 28x28 pixels, conv for other images of 16x16 and more)",
            "epochs": f"passes over the unlabelled data (default {d.epochs})",
            "batch_size": f"unlabelled points per step (default {d.batch_size})",
            "seed": "random seed: initialisation and training, and the split and labelled "
            f"subset unless --data-seed is given (default {d.seed})",
        },
    )
    g = groups["data"]
    g.add_argument(
        "--svhn-extra",
        action="store_true",
        default=None,
        help="add SVHN's 531,131 'extra' images to the training data (about 6.5 GB as float32)",
    )
    g.add_argument(
        "--labels",
        type=_labels,
        help=f"labelled training examples, class-balanced, fixed by --seed; 'all' gives a conditional VAE (default {d.labels})",
    )
    g.add_argument("--num-classes", type=int, help="number of classes (default: the data's)")
    g.add_argument(
        "--features",
        help="M1+M2: train M2 on the codes of this VAE run (ppl-vae fit RUN_DIR) of its own "
        "data and split, instead of on the data",
    )
    g.add_argument(
        "--features-mode",
        choices=("mean", "sample"),
        help="the codes: posterior means (default) or one draw of q(z|x) per point",
    )
    g = groups["model"]
    g.add_argument(
        "--label-guide",
        help=f"q(y|x) strategy: enumerate, relaxed, sample, or 'file.py:Class' (default {d.label_guide})",
    )
    g.add_argument(
        "--label-guide-arg",
        action="append",
        metavar="KEY=VALUE",
        help="label guide option, repeatable (e.g. dropout=0.5, final_temperature=0.3)",
    )
    g.add_argument(
        "--alpha",
        type=_alpha,
        help=f"classification loss weight, Kingma et al.'s alpha divided by N, or 'auto': "
        f"{ALPHA_PER_DIMENSION:g} x the data's dimensions (default {d.alpha}; the paper's 0.1)",
    )
    g.add_argument("--class-probs", type=_float_list, help="p(y), comma list (default uniform)")
    g = groups["optimisation"]
    g.add_argument(
        "--labelled-batch-size",
        type=int,
        help="labelled points per step (default: --batch-size, at most --labels)",
    )
    g = groups["execution"]
    g.add_argument(
        "--elbo-samples",
        type=int,
        help=f"z samples per class for the test ELBO (default {d.elbo_samples})",
    )
    g.add_argument(
        "--baseline",
        choices=("supervised",),
        help="also train the same classifier on the labelled subset alone and report its test accuracy",
    )
    g.add_argument(
        "--baseline-patience",
        type=int,
        help="stop the baseline after this many epochs without a better validation accuracy (default: whole budget)",
    )
    g.add_argument("--baseline-lr", type=float, help="the baseline's learning rate (default: --lr)")
    g.add_argument(
        "--baseline-epochs", type=int, help="the baseline's budget in epochs (default: --epochs)"
    )
    g.add_argument(
        "--baseline-dropout",
        type=float,
        help="the baseline classifier's dropout (default: the label guide's, 0)",
    )
    p.add_argument("--out", type=out_path, help="run directory (default runs/ssl-TIMESTAMP)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint with its saved config "
        "(only --epochs, which may be raised, and --device may be given)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tracker_option(p)
    p.set_defaults(func=cmd_ssl)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~ppl_vae.ssl.SSLConfig` fields given on the command line."""
    from ..ssl import SSLConfig

    return run_config_from_args(args, SSLConfig)


def cmd_ssl(args: argparse.Namespace) -> int:
    """Run ``ppl-vae ssl``: train, evaluate, print the accuracies and the run directory."""
    from ..training.distributed import environment
    from ..training.rundir import run_dir_lock

    out = Path(args.out) if args.out else Path("runs") / time.strftime("ssl-%Y%m%d-%H%M%S")
    # One process per run directory (under torchrun, rank 0 holds the lock for the job).
    with run_dir_lock(out) if environment()[0] == 0 else contextlib.nullcontext():
        return _ssl(args, out)


def _ssl(args: argparse.Namespace, out: Path) -> int:
    from ..ssl import SSLConfig, fit_ssl

    given = config_from_args(args)
    if args.resume:
        if not args.out:
            raise ConfigError("--resume needs --out, the run directory to continue")
        if args.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if args.config:
            raise ConfigError("--resume uses the run's saved config.toml; drop --config")
        extra = sorted(k for k in given if k not in ("epochs", "device"))
        if extra:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise ConfigError(
                f"--resume uses the run's saved config; only --epochs and --device may be "
                f"given, got {flags}"
            )
        result = fit_ssl(
            out=out, resume=True, quiet=args.quiet, callbacks=trackers_from_args(args), **given
        )
    else:
        base = SSLConfig.load(args.config).to_dict() if args.config else {}
        base.update(given)
        cfg = SSLConfig.from_dict(base)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
        result = fit_ssl(
            cfg,
            out=out,
            overwrite=args.overwrite,
            quiet=args.quiet,
            callbacks=trackers_from_args(args),
        )
    from ..training.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    m = result.metrics
    baseline = (
        f" (supervised baseline on the same labels: {m['baseline_test_accuracy']:.4f})"
        if "baseline_test_accuracy" in m
        else ""
    )
    print(
        f"test accuracy {m['test_accuracy']:.4f}{baseline} with {m['labels']} labels; "
        f"test ELBO {m['test_elbo']:.3f} nats per point (y summed out); {m['epochs']} epochs, "
        f"{m['seconds_per_epoch']:.2f} s per epoch; run directory: {out}"
    )
    return 0
