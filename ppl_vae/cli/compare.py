r"""``ppl-vae compare``: train one model with several ELBO estimators and seeds, and tabulate.

Example::

    ppl-vae compare --estimators trace,meanfield,tracegraph,iwae:5,renyi:0.5 --seeds 0,1,2 \
        --epochs 50 --out runs/compare
    ppl-vae compare --kind m2 --label-guides enumerate,relaxed,sample --labels 50 --epochs 50 \
        --out runs/compare-m2

Takes the model flags of ``ppl-vae fit`` (``--estimator`` excepted; ``--seed`` fixes the data
split, ``--seeds`` the training runs). With ``--kind m2`` (or a ``--config`` that records kind
``m2``, e.g. an ``ppl-vae ssl`` run's ``config.toml``) it compares (estimator, label guide) rows
of the M2 model and also takes ``ppl-vae ssl``'s M2 flags (``--labels``, ``--label-guide``,
``--alpha``, ...), declared by ``ppl-vae ssl`` itself and parsed the same way. :func:`register`
adds the command to the ``ppl-vae`` parser; ``python -m ppl_vae.cli.compare [flags]`` runs it on
its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..models.errors import ConfigError
from .common import Parser, out_path
from .fit import add_model_options, config_from_args

DEFAULT_ESTIMATORS = "trace,meanfield,tracegraph,iwae:5,dreg:5,stl"
DEFAULT_SEEDS = "0,1,2"
#: The ``ppl-vae ssl`` flags ``compare --kind m2`` takes (their ``dest``), besides the shared ones.
M2_DESTS = (
    "labels",
    "num_classes",
    "svhn_extra",
    "label_guide",
    "label_guide_arg",
    "alpha",
    "class_probs",
    "labelled_batch_size",
    "elbo_samples",
)


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


def _ssl_actions() -> list[argparse.Action]:
    """``ppl-vae ssl``'s own declarations of the M2 flags (same parsing, same help)."""
    from . import ssl

    parser = Parser(prog="ppl-vae")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    ssl.register(sub)
    return [a for a in sub.choices["ssl"]._actions if a.dest in M2_DESTS]


def register(subparsers: Any) -> None:
    r"""Add the ``compare`` command to an ``argparse`` sub-parser collection.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers`` returned (the ``ppl-vae`` parser's).
    """
    p = subparsers.add_parser(
        "compare",
        help="compare ELBO estimators (M2: estimators and label guides) on one model, data split "
        "and set of seeds",
        description=(
            "Train the same VAE (same data split, same initial weights per seed) once per "
            "estimator and seed; write compare.csv, compare.md (mean ± sd over seeds), "
            "figures and arviz NetCDF posterior draws. --seed fixes the data split; --seeds "
            "the training runs. --kind m2 compares (estimator, label guide) rows of the M2 "
            "semi-supervised model instead, with test accuracy."
        ),
    )
    p.add_argument(
        "--kind",
        choices=("vae", "user", "m2"),
        help="model kind: vae (the built-in VAE), user (--model), m2 (the ppl-vae ssl model); "
        "default the kind --config records, else vae",
    )
    p.add_argument(
        "--estimators",
        help=f"comma-separated estimator specs (default {DEFAULT_ESTIMATORS}); with --kind m2 "
        "also 'auto' (each label guide's own: enum, trace, tracegraph; the default) and pairs "
        "ESTIMATOR@GUIDE (e.g. enum@enumerate,trace@relaxed,iwae:5@relaxed)",
    )
    p.add_argument(
        "--label-guides",
        help="--kind m2: comma-separated label guides, each paired with every estimator not "
        "given as a pair (default --label-guide)",
    )
    p.add_argument(
        "--seeds", type=_seed_list,
        help=f"comma-separated training seeds (default {DEFAULT_SEEDS}; --kind m2: --seed, and "
        "each seed is a whole ppl-vae ssl --seed: data split, labelled subset, initial weights)",
    )  # fmt: skip
    p.add_argument("--config", help="a config.toml/.json to start from (flags override it)")
    add_model_options(p)
    m2 = p.add_argument_group(
        "M2 (--kind m2; as ppl-vae ssl, whose defaults the shared options then take)"
    )
    for action in _ssl_actions():
        m2._add_action(action)
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
        help="size of the fixed gradient batch (default --batch-size; M2: its unlabelled points, "
        "beside one labelled batch)",
    )  # fmt: skip
    g.add_argument(
        "--khat-points", type=int, default=100,
        help="test points whose PSIS k-hat is computed (default 100; 0 skips)",
    )  # fmt: skip
    g.add_argument(
        "--khat-samples", type=int,
        help="importance samples per point for k-hat (default --log-likelihood-samples; M2: z "
        "per class, default 100)",
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


def _flags(names: Sequence[str]) -> str:
    return ", ".join(
        "--" + n.removesuffix("_args").replace("_", "-") + ("-arg" if n.endswith("_args") else "")
        for n in names
    )


def _apply(names: Sequence[str]) -> str:
    return "applies" if len(names) == 1 else "apply"


def _kind_and_base(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The model kind (``--kind``, else the one ``--config`` records, else ``vae``) and the
    options ``--config`` gives."""
    from ..config import ConfigFile, load_run_config, run_kind

    kind = args.kind
    if not args.config:
        return kind or "vae", {}
    recorded = run_kind(args.config)
    if kind is not None and ConfigFile.by_kind[kind] is not ConfigFile.by_kind[recorded]:
        raise ConfigError(
            f"--kind {kind} asked for, but --config {args.config!r} records model kind {recorded!r}"
        )
    return kind or recorded, load_run_config(args.config).to_dict()


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``ppl-vae compare``; print the Markdown table."""
    from ..config import FitConfig, SSLConfig
    from ..runs.compare import compare_estimators
    from .ssl import config_from_args as ssl_config_from_args

    given = config_from_args(args)
    if "estimator" in given:
        raise ConfigError(
            "ppl-vae compare takes --estimators (a comma-separated list), not --estimator, "
            f"got --estimator {given['estimator']!r}"
        )
    kind, base = _kind_and_base(args)
    fit_names = {f.name for f in fields(FitConfig)}
    ssl_names = {f.name for f in fields(SSLConfig)}
    if kind == "m2":
        wrong = sorted(set(given) - ssl_names)
        if wrong:
            raise ConfigError(
                f"{_flags(wrong)} {_apply(wrong)} to ppl-vae fit's kinds (--kind vae or user), not to "
                "--kind m2"
            )
        given = ssl_config_from_args(args)
        if args.seeds is not None and "seed" in given:
            raise ConfigError(
                "with --kind m2 each of --seeds is a whole ppl-vae ssl --seed (data split, "
                "labelled subset, initial weights): give --seeds or --seed, not both"
            )
        seeds = args.seeds
        estimators = args.estimators
    else:
        m2_given = sorted(set(ssl_config_from_args(args)) - fit_names)
        if args.label_guides is not None:
            m2_given.insert(0, "label_guides")
        if m2_given:
            raise ConfigError(
                f"{_flags(m2_given)} {_apply(m2_given)} to --kind m2 only (add --kind m2)"
            )
        seeds = args.seeds if args.seeds is not None else _seed_list(DEFAULT_SEEDS)
        estimators = args.estimators if args.estimators is not None else DEFAULT_ESTIMATORS
    base.update(given)
    out = Path(args.out) if args.out else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    result = compare_estimators(
        estimators,
        seeds,
        base,
        out,
        kind=args.kind or ("m2" if kind == "m2" else None),  # vae/user: what --model says
        label_guides=args.label_guides,
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
    """``python -m ppl_vae.cli.compare [flags]``: the ``compare`` command on its own, through the
    command line's one error layer (:func:`ppl_vae.cli.main`)."""
    from . import main as cli_main

    return cli_main(["compare", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
