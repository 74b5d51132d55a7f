r"""``ppl-vae compare``: train one model with several ELBO estimators and seeds, and tabulate.

Example::

    ppl-vae compare --estimators trace,meanfield,tracegraph,iwae:5,renyi:0.5 --seeds 0,1,2 \
        --epochs 50 --out runs/compare

Takes the model flags of ``ppl-vae fit`` (``--estimator`` excepted; ``--seed`` fixes the data
split, ``--seeds`` the training runs). :func:`register` adds the command to the ``ppl-vae``
parser; ``python -m ppl_vae.cli.compare [flags]`` runs it on its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..models.errors import ConfigError
from .common import EXIT_USAGE, Parser, out_path
from .fit import add_model_options, config_from_args

DEFAULT_ESTIMATORS = "trace,meanfield,tracegraph,iwae:5,dreg:5,stl"
DEFAULT_SEEDS = "0,1,2"


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of integers (e.g. 0,1,2), got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return seeds


def _epoch_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of epochs (e.g. 1,25,50), got {text!r}"
        ) from None


def register(subparsers: Any) -> None:
    r"""Add the ``compare`` command to an ``argparse`` sub-parser collection.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned (the ``ppl-vae`` parser's).
    """
    p = subparsers.add_parser(
        "compare",
        help="compare ELBO estimators on one model, data split and set of seeds",
        description=(
            "Train the same VAE (same data split, same initial weights per seed) once per "
            "estimator and seed; write compare.csv, compare.md (mean ± sd over seeds), "
            "figures and arviz NetCDF posterior draws. --seed fixes the data split; --seeds "
            "the training runs."
        ),
    )
    p.add_argument(
        "--estimators",
        default=DEFAULT_ESTIMATORS,
        help=f"comma-separated estimator specs (default {DEFAULT_ESTIMATORS})",
    )
    p.add_argument(
        "--seeds", type=_seed_list, default=_seed_list(DEFAULT_SEEDS),
        help=f"comma-separated training seeds (default {DEFAULT_SEEDS})",
    )  # fmt: skip
    p.add_argument("--config", help="a config.toml/.json to start from (flags override it)")
    add_model_options(p)
    g = p.add_argument_group("measurements")
    g.add_argument(
        "--grad-points", type=_epoch_list,
        help="epochs after which gradient variance/SNR are measured (default first,middle,last)",
    )  # fmt: skip
    g.add_argument(
        "--grad-repeats", type=int, default=100,
        help="gradient evaluations per measurement (default 100)",
    )  # fmt: skip
    g.add_argument(
        "--grad-batch-size", type=int,
        help="size of the fixed gradient batch (default --batch-size)",
    )  # fmt: skip
    g.add_argument(
        "--khat-points", type=int, default=100,
        help="test points whose PSIS k-hat is computed (default 100; 0 skips)",
    )  # fmt: skip
    g.add_argument(
        "--khat-samples", type=int,
        help="importance samples per point for k-hat (default --log-likelihood-samples)",
    )  # fmt: skip
    g.add_argument(
        "--posterior-points", type=int, default=5,
        help="test points whose posterior draws are saved as NetCDF (default 5)",
    )  # fmt: skip
    g.add_argument("--posterior-draws", type=int, default=500, help="draws per point (default 500)")
    g.add_argument(
        "--in-process", action="store_true",
        help="run everything in this process (faster start; CPU memory is then not measured)",
    )  # fmt: skip
    g.add_argument(
        "--fit-figures", action="store_true", help="let each run write fit's own figures"
    )
    p.add_argument("--out", type=out_path, help="output directory (default runs/compare-TIMESTAMP)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier comparison in --out"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``ppl-vae compare``; print the Markdown table."""
    from ..config import FitConfig
    from ..runs.compare import compare_estimators

    given = config_from_args(args)
    if "estimator" in given:
        raise ConfigError(
            "ppl-vae compare takes --estimators (a comma-separated list), not --estimator, "
            f"got --estimator {given['estimator']!r}"
        )
    base = FitConfig.load(args.config).to_dict() if args.config else {}
    base.update(given)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    result = compare_estimators(
        args.estimators,
        args.seeds,
        base,
        out,
        grad_points=args.grad_points,
        grad_repeats=args.grad_repeats,
        grad_batch_size=args.grad_batch_size,
        khat_points=args.khat_points,
        khat_samples=args.khat_samples,
        posterior_points=args.posterior_points,
        posterior_draws=args.posterior_draws,
        isolate=not args.in_process,
        overwrite=args.overwrite,
        fit_figures=args.fit_figures,
        quiet=args.quiet,
    )
    print(result.markdown())
    print(f"wrote {out}/compare.csv, compare.md, curves.csv, khat.csv, figures/ and runs/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ppl_vae.cli.compare [flags]``: the ``compare`` command on its own."""
    parser = Parser(prog="ppl-vae")
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    from ..train import TrainingError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"ppl-vae compare: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as e:
        print(f"ppl-vae compare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ppl-vae compare: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
