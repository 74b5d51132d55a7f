r"""``ppl-vae fit``: train the built-in VAE, or a user's model/guide pair, and write a run."""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..models.errors import ConfigError
from .common import (
    add_network_options,
    add_schedule_options,
    add_tracker_option,
    int_list,
    key_values,
    out_path,
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
    from ..config import FitConfig

    d = FitConfig()
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help=f"'digits', 'mnist', 'fashion-mnist', 'svhn' or a .npy/.npz file (default {d.data})",
    )
    g.add_argument("--test-data", help="a fixed test file (default: split off the data by seed)")
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
        help=f"binarise pixels (default {d.binarize}: dynamic when the likelihood needs binary data)",
    )
    g.add_argument("--max-train", type=int, help="use at most this many training points")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="your own model/guide pair, 'file.py:Class' or 'package.module:Class': a module "
        "whose model(x) observes x under pyro.plate('data') and whose guide(x) samples every "
        "latent site (default: the built-in VAE from the options below); a file is imported, "
        "i.e. its code runs",
    )
    g.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="option of --model's constructor, repeatable (data_shape is passed if it takes one)",
    )
    g.add_argument(
        "--prior",
        help=f"prior name, 'file.py:Class' or 'package.module:Class' (default {d.prior}); a file is imported, i.e. its code runs",
    )
    g.add_argument(
        "--prior-arg",
        action="append",
        metavar="KEY=VALUE",
        help="prior option, repeatable (e.g. concentration=2.0)",
    )
    g.add_argument(
        "--likelihood", help=f"likelihood name or 'file.py:Class' (default {d.likelihood})"
    )
    g.add_argument(
        "--likelihood-arg",
        action="append",
        metavar="KEY=VALUE",
        help="likelihood option, repeatable (e.g. scale=fixed)",
    )
    g.add_argument("--latent-dim", type=int, help=f"latent dimensions (default {d.latent_dim})")
    g.add_argument(
        "--hidden-dims",
        type=int_list,
        help="hidden widths, comma list; empty gives linear maps (default 256,128)",
    )
    g.add_argument(
        "--network", choices=("auto", "mlp", "conv"), help=f"network type (default {d.network})"
    )
    add_network_options(g)
    g = p.add_argument_group("objective and optimisation")
    g.add_argument(
        "--estimator",
        help=f"ELBO estimator, e.g. trace, meanfield, tracegraph, iwae:5, renyi:0.5 (default {d.estimator})",
    )
    g.add_argument(
        "--num-particles", type=int, help=f"particles per step (default {d.num_particles})"
    )
    g.add_argument(
        "--vectorize-particles", action="store_true", default=None, help="vectorise the particles"
    )
    g.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"mini-batch size (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
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
    g.add_argument("--clip-norm", type=float, help="clip the gradient norm (default off)")
    add_schedule_options(g)
    g = p.add_argument_group("evaluation and execution")
    g.add_argument(
        "--log-likelihood-samples",
        type=int,
        help=f"importance samples K for the test log-likelihood (default {d.log_likelihood_samples})",
    )
    g.add_argument(
        "--figure-draws",
        action="store_true",
        default=None,
        help="reconstruction/sample figures show draws from p(x|z), not its mean",
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="device (default auto: cuda if available)"
    )
    g.add_argument("--seed", type=int, help=f"random seed (default {d.seed})")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Options given on the command line (``None`` means: not given)."""
    from ..config import FitConfig

    given: dict[str, Any] = {}
    for f in fields(FitConfig):
        if f.name.endswith("_args"):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = v
    for part in (
        "model",
        "prior",
        "likelihood",
        "encoder",
        "decoder",
        "guide_family",
        "lr_schedule",
        "beta_schedule",
    ):
        if getattr(args, f"{part}_arg", None):
            flag = f"--{part.replace('_', '-')}-arg"
            given[f"{part}_args"] = key_values(getattr(args, f"{part}_arg"), flag)
    return given


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
