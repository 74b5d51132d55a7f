r"""The ``ppl-vae`` command line: ``fit``, ``evaluate``, ``sample``.

Every option has a default, so ``ppl-vae fit`` alone trains on the built-in digits data. Bad
input ends with a one-line ``error: ...`` and exit code 2, never a traceback, and never changes an
existing run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from .models.errors import ConfigError

EXIT_USAGE = 2
#: ``ppl-vae sample`` on an M2 run: samples per class unless ``-n`` says otherwise.
SAMPLES_PER_CLASS = 10


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (``ppl-vae fit: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _literal(text: str) -> Any:
    """Parse ``key=value`` option values: JSON literals (numbers, true/false, lists) or strings."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = _literal(value)
    return out


def _int_list(text: str) -> list[int]:
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
    from .components import available

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
    from .training.trackers import make_tracker

    return [make_tracker(spec) for spec in args.log]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    from .config import FitConfig

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
        type=_int_list,
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


def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Options given on the command line (``None`` means: not given)."""
    from .config import FitConfig

    given: dict[str, Any] = {}
    for f in fields(FitConfig):
        if f.name.endswith("_args"):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            given[f.name] = v
    for part in ("model", "prior", "likelihood", "encoder", "decoder", "lr_schedule"):
        if getattr(args, f"{part}_arg", None):
            flag = f"--{part.replace('_', '-')}-arg"
            given[f"{part}_args"] = _key_values(getattr(args, f"{part}_arg"), flag)
    return given


def cmd_fit(args: argparse.Namespace) -> int:
    from .config import FitConfig
    from .train import fit

    given = _config_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("fit-%Y%m%d-%H%M%S")
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
    from .distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    m = result.metrics
    print(
        f"test ELBO {m['test_elbo']:.3f}, test log-likelihood {m['test_log_likelihood']:.3f} "
        f"(K={m['log_likelihood_samples']}) nats per data point; {m['epochs']} epochs in "
        f"{m['train_seconds']:.1f} s; run directory: {out}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .runs import evaluate

    out = evaluate(
        args.run_dir,
        num_samples=args.log_likelihood_samples,
        device=args.device,
        test_data=args.test_data,
    )
    print(json.dumps(out, indent=2))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import pyro
    import torch

    from .figures import _as_images, image_grid
    from .runs import load_run

    if args.n is not None and args.n <= 0:
        raise ConfigError(f"-n must be positive, got {args.n}")
    run = load_run(args.run_dir, device=args.device)
    m2 = run.kind == "m2"
    n = args.n if args.n is not None else (SAMPLES_PER_CLASS if m2 else 64)
    name = f"samples_n{n}_per_class.npy" if m2 else f"samples_n{n}.npy"
    out = Path(args.out) if args.out else run.run_dir / name
    if out.suffix != ".npy":
        raise ConfigError(f"--out must be a .npy file, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{str(out)!r} exists; pass --overwrite to replace it")
    what = "draws from p(x|z)" if args.draw else "likelihood mean"
    pyro.set_rng_seed(args.seed)
    with torch.no_grad():
        if m2:
            # n codes z ~ p(z), each decoded with every class: x[k, j] is class k, style z_j.
            z, x = run.model.sample_per_class(n, draw=args.draw)
        elif run.kind == "user":
            from .kinds.user import sample_from_model

            x = sample_from_model(run.model, run.dataset.test_x, n, draw=args.draw)
        else:
            z, x = run.vae.sample(n)
            if args.draw:
                x = run.vae.decode(z).sample()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, x.cpu().numpy())
    cols = min(16, n)
    if m2:
        names = list(run.dataset.class_names or [str(i) for i in range(len(x))])
        rows, titles = [], []
        for c in range(len(x)):
            imgs = _as_images(x[c], run.dataset.image_shape)
            for i in range(0, n, cols):
                rows.append(imgs[i : i + cols])
                titles.append(f"class {names[c]}" if i == 0 else "")
        png = image_grid(
            out.with_suffix(".png"),
            rows,
            titles,
            suptitle=f"{n} samples per class (rows);\nz ~ p(z) shared down each column ({what})",
        )
    else:
        imgs = _as_images(x, run.dataset.image_shape)
        png = image_grid(
            out.with_suffix(".png"),
            [imgs[i : i + cols] for i in range(0, n, cols)],
            suptitle=f"{n} samples ({what})",
        )
    print(f"wrote {out} ({tuple(x.shape)}) and {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ppl-vae",
        description="Variational autoencoders as Pyro model/guide pairs.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ppl-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "fit",
        help="train a VAE and write a run directory",
        description="Train a VAE with SVI; every option has a default (digits, Gaussian prior, Bernoulli likelihood).",
    )
    p.add_argument("--config", help="a config.toml/.json to start from (flags override it)")
    _add_model_options(p)
    p.add_argument("--out", help="run directory (default runs/fit-TIMESTAMP)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tracker_option(p)
    p.set_defaults(func=cmd_fit)

    from .kinds.m2 import LOG_LIKELIHOOD_SAMPLES

    p = sub.add_parser(
        "evaluate",
        help="test ELBO and importance-sampled log-likelihood of a run (M2: and accuracy)",
        description="Evaluate a run directory of any kind on its test split. VAE runs: test ELBO "
        "and importance-sampled log p(x). M2 runs (`ppl-vae ssl`), with the best-validation "
        "weights the run evaluated: test accuracy (overall and per class), the unlabelled ELBO "
        "and log p(x), both with y summed out exactly. Writes RUN_DIR/evaluation.json and "
        "per-point scores.",
    )
    p.add_argument("run_dir", help="a run directory written by `ppl-vae fit` or `ppl-vae ssl`")
    p.add_argument(
        "--log-likelihood-samples",
        type=int,
        help="importance samples K (default: the run's; M2: K z per class, default "
        f"{LOG_LIKELIHOOD_SAMPLES})",
    )
    p.add_argument(
        "--test-data",
        help="score this .npy/.npz file instead of the test split (M2: accuracy if it has "
        "labels 'y', else log p(x) and ELBO only)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run's prior and decoder",
        description="Draw z ~ p(z) and decode. VAE runs: N samples, saved as (N, *data_shape). "
        "M2 runs: N codes z ~ p(z), each decoded with every class y, saved as "
        "(K, N, *data_shape) (x[k, j]: class k with the style z_j; one row per class in the "
        ".png).",
    )
    p.add_argument("run_dir", help="a run directory written by `ppl-vae fit` or `ppl-vae ssl`")
    p.add_argument(
        "-n",
        type=int,
        default=None,
        help=f"number of samples (default 64; M2 runs: per class, default {SAMPLES_PER_CLASS})",
    )
    p.add_argument(
        "--out",
        help="a .npy file (default RUN_DIR/samples_nN.npy, M2: samples_nN_per_class.npy; a .png "
        "is written beside it)",
    )
    p.add_argument(
        "--draw",
        action="store_true",
        help="draw x ~ p(x|z) instead of showing the likelihood's mean E[x|z]",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.set_defaults(func=cmd_sample)

    from .compare_cli import register as register_compare

    register_compare(sub)
    from .ssl_cli import register as register_ssl

    register_ssl(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import environment
    from .train import TrainingError

    # Under torchrun every rank reports its own error; ranks other than 0 say which they are.
    try:
        rank = environment()[0]
    except ConfigError:
        rank = 0
    prog = f"ppl-vae {args.command}" + (f" (rank {rank})" if rank else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError (a RuntimeError) and the CPU allocator's "can't allocate memory"
        text = str(e).strip()
        if not isinstance(e, MemoryError) and not any(
            s in text for s in ("out of memory", "can't allocate memory")
        ):
            raise
        first = text.splitlines()[0] if text else type(e).__name__
        print(
            f"{prog}: error: out of memory ({first}); try a smaller --batch-size, --hidden-dims, "
            "--latent-dim, --num-particles or --log-likelihood-samples",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
