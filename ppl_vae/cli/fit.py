r"""``ppl-vae fit``: train the built-in VAE, or a user's model/guide pair, and write a run."""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

from ..models.errors import ConfigError
from .common import (
    add_run_options,
    add_tracker_option,
    out_path,
    run_config_from_args,
    trackers_from_args,
)

__all__ = ["add_model_options", "cmd_fit", "config_from_args", "register"]


def register(sub: Any) -> None:
    """Add ``fit`` to the ``ppl-vae`` sub-parsers."""
    p = sub.add_parser(
        "fit",
        help="train a VAE and write a run directory",
        description="Train a VAE with SVI; every option has a default (digits, Gaussian prior, Bernoulli likelihood).",
    )
    p.add_argument("--config", help="a config.toml/.json to start from (flags override it)")
    add_model_options(p)
    p.add_argument("--out", type=out_path, help="run directory (default runs/fit-TIMESTAMP)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tracker_option(p)
    p.set_defaults(func=cmd_fit)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The flags of :class:`~ppl_vae.config.FitConfig`: the shared ones
    (:func:`~ppl_vae.cli.common.add_run_options`) and fit's own."""
    from ..config import FitConfig

    d = FitConfig()
    groups = add_run_options(p, d)
    g = groups["model"]
    g.add_argument(
        "--model",
        help="a model/guide pair instead of the built-in VAE: a shipped one (hierarchical, "
        "ladder), 'file.py:Class' or 'package.module:Class': a module whose model(x) observes "
        "x under pyro.plate('data') and whose guide(x) samples every latent site; a file is "
        "imported, i.e. its code runs",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="option of --model's constructor, repeatable (data_shape, prior, likelihood, "
        "latent_dim and hidden_dims are passed if it takes them)",
    )
    g = groups["optimisation"]
    g.add_argument(
        "--estimator",
        help=f"ELBO estimator, e.g. trace, meanfield, tracegraph, iwae:5, renyi:0.5 (default {d.estimator})",
    )
    g.add_argument(
        "--vectorize-particles", action="store_true", default=None, help="vectorise the particles"
    )
    g.add_argument("--beta", type=float, help=f"KL weight (default {d.beta})")
    g.add_argument(
        "--warmup-epochs",
        type=float,
        help="linear KL warm-up from 0 to beta over this many epochs (default 0)",
    )
    g.add_argument(
        "--beta-schedule",
        help="shape of the KL weight: linear (the warm-up; default), cyclical (Fu et al. 2019: "
        "--beta-schedule-arg cycles=4 ratio=0.5), or 'file.py:function' of (step, total_steps)",
    )
    g.add_argument(
        "--beta-schedule-arg",
        action="append",
        metavar="KEY=VALUE",
        help="option of the beta schedule, repeatable (e.g. cycles=4)",
    )
    g.add_argument(
        "--free-bits",
        type=float,
        help="KL floor in nats per latent dimension (Kingma et al. 2016; trace/meanfield; "
        "default 0: off)",
    )
    g = groups["execution"]
    g.add_argument(
        "--log-likelihood-samples",
        type=int,
        help=f"importance samples K for the test log-likelihood (default {d.log_likelihood_samples})",
    )
    g.add_argument(
        "--eval-memory",
        help="memory budget of the test log-likelihood's importance-sampling chunks, e.g. "
        "512MiB (the default) or 2GB; the chunk shrinks to fit it",
    )
    g.add_argument(
        "--figure-draws",
        action="store_true",
        default=None,
        help="reconstruction/sample figures show draws from p(x|z), not its mean",
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Options given on the command line (``None`` means: not given)."""
    from ..config import FitConfig

    return run_config_from_args(args, FitConfig)


def cmd_fit(args: argparse.Namespace) -> int:

    given = config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("fit-%Y%m%d-%H%M%S")
    from ..training.distributed import environment
    from ..training.rundir import run_dir_lock

    # One process per run directory (under torchrun, rank 0 holds the lock for the job).
    with run_dir_lock(out) if environment()[0] == 0 else contextlib.nullcontext():
        return _fit(args, given, out)


def _fit(args: argparse.Namespace, given: dict[str, Any], out: Path) -> int:
    from ..config import FitConfig
    from ..train import fit

    if args.resume:
        for flag, value in (("--config", args.config), ("--overwrite", args.overwrite)):
            if value:
                raise ConfigError(
                    f"--resume continues a run with its saved config; it cannot be combined "
                    f"with {flag}"
                )
        # fit() refuses any option but `epochs` and `device` (one line, exit 2), so a flag
        # given with --resume is never silently ignored.
        result = fit(
            out=out, resume=True, quiet=args.quiet, callbacks=trackers_from_args(args), **given
        )
    else:
        base = FitConfig.load(args.config).to_dict() if args.config else {}
        base.update(given)
        result = fit(
            FitConfig.from_dict(base),
            out=out,
            overwrite=args.overwrite,
            quiet=args.quiet,
            callbacks=trackers_from_args(args),
        )
    from ..training.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    m = result.metrics
    print(
        f"test ELBO {m['test_elbo']:.3f}, test log-likelihood {m['test_log_likelihood']:.3f} "
        f"(K={m['log_likelihood_samples']}) nats per data point; {m['epochs']} epochs in "
        f"{m['train_seconds']:.1f} s; run directory: {out}"
    )
    return 0
