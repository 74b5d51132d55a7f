r"""``ppl-vae score``: per-point anomaly scores of any data under a trained run, with AUROC and
AUPRC against inlier/outlier labels (:mod:`ppl_vae.runs.score`)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import int_list, out_path

__all__ = ["add_eval_memory_option", "cmd_score", "register"]


def add_eval_memory_option(p: Any, note: str = "") -> None:
    """``--eval-memory SIZE`` (``score`` and ``evaluate``)."""
    from ..inference.scoring import DEFAULT_EVAL_MEMORY, format_memory

    p.add_argument(
        "--eval-memory",
        metavar="SIZE",
        default=DEFAULT_EVAL_MEMORY,
        help="memory one evaluation pass may use, e.g. 1GB or 256MiB: the importance-sampling "
        "chunk (particles x points) is cut to fit, measured by a probe pass (default "
        f"{format_memory(DEFAULT_EVAL_MEMORY)}){note}",
    )


def register(sub: Any) -> None:
    """Add ``score`` to the ``ppl-vae`` sub-parsers."""
    from ..runs.score import SPLITS, TERM_SAMPLES

    p = sub.add_parser(
        "score",
        help="per-point log p(x), ELBO, reconstruction and KL of any data (anomaly scoring)",
        description="Score data under a trained run (kinds vae and user): per point, the "
        "importance-sampled log p(x), the ELBO, the reconstruction term E_q[log p(x|z)], the KL "
        "(analytic where Pyro has a closed form, else Monte Carlo) and bits/dim. With inlier/"
        "outlier labels, AUROC and AUPRC of each score and a histogram figure. Writes "
        "scores.csv and summary.json into --out.",
    )
    p.add_argument("run_dir", help="a run directory written by `ppl-vae fit`")
    p.add_argument(
        "--data",
        default="test",
        help=f"what to score: {' or '.join(SPLITS)} (the run's own split, default test), a data "
        "set name (its test split) or a .npy/.npz file of the run's per-point shape (labels "
        "'y' optional)",
    )
    p.add_argument("--labels", help="a .npy (or text) file of 0 (inlier) / 1 (outlier) per point")
    p.add_argument(
        "--outlier-classes",
        type=int_list,
        metavar="LIST",
        help="classes that are outliers, e.g. 9 or 8,9 (needs class labels in --data)",
    )
    p.add_argument(
        "--log-likelihood-samples",
        type=int,
        help="importance samples K per point (default: the run's)",
    )
    p.add_argument(
        "--term-samples",
        type=int,
        default=TERM_SAMPLES,
        help=f"draws per point of the reconstruction term and Monte Carlo KLs (default "
        f"{TERM_SAMPLES})",
    )
    add_eval_memory_option(p)
    p.add_argument("--out", type=out_path, help="output directory (default RUN_DIR/score-<data>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--seed", type=int, help="random seed (default: the run's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    from ..runs.score import score_run

    s = score_run(
        args.run_dir,
        args.data,
        labels=args.labels,
        outlier_classes=args.outlier_classes,
        num_samples=args.log_likelihood_samples,
        term_samples=args.term_samples,
        eval_memory=args.eval_memory,
        device=args.device,
        seed=args.seed,
        out=args.out,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    m = s["mean"]
    line = (
        f"scored {s['num_points']} points of {s['data']}: log p(x) {m['log_likelihood']:.3f} "
        f"(K={s['log_likelihood_samples']}), ELBO {m['elbo']:.3f}, recon {m['recon']:.3f}, "
        f"KL {m['kl']:.3f} nats per point"
    )
    if "anomaly" in s:
        a = s["anomaly"]
        line += (
            f"; {s['outliers']['num_outliers']} outliers: AUROC log p(x) "
            f"{a['log_likelihood']['auroc']:.3f}, reconstruction error "
            f"{a['reconstruction_error']['auroc']:.3f}"
        )
    print(f"{line}; wrote {s['files']['scores']} and summary.json")
    return 0
