r"""Compare ELBO estimators on the bundled digits data, from Python.

Trains the same Gaussian-prior, Bernoulli-likelihood VAE once per estimator and seed (same data
split; same initial weights for a given seed) and prints the table of test ELBO, importance-
sampled log-likelihood, gradient SNR of encoder and decoder, PSIS k-hat, time and memory.
Outputs (CSV, Markdown, figures, NetCDF posterior draws) go to ``--out``.

.. math:: \mathrm{SNR}_j = |\mathbb{E}[g_j]| / \sqrt{\operatorname{Var}[g_j]}

Run::

    python examples/compare_estimators.py --epochs 30 --out runs/compare-example
    python examples/compare_estimators.py --smoke          # a few seconds: checks it runs
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence

from ppl_vae.cli import Parser, int_list, run_command
from ppl_vae.runs.compare import compare_estimators


def main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--estimators",
        default="trace,meanfield,tracegraph,iwae:5,dreg:5,stl",
        help="comma-separated estimator specs",
    )
    parser.add_argument("--seeds", type=int_list, default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run")
    parser.add_argument("--out", help="output directory (default: a temporary directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier outputs")
    parser.add_argument(
        "--in-process", action="store_true", help="no fresh process per run (no CPU memory)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny budget: checks that it runs")
    args = parser.parse_args(argv)

    estimators = [s for s in args.estimators.split(",") if s]
    seeds = args.seeds
    options: dict = dict(epochs=args.epochs, device="auto")
    measure: dict = dict(grad_repeats=100, khat_points=100)
    if args.smoke:
        estimators, seeds = ["trace", "iwae:2", "dreg:2"], [0]
        options = dict(
            epochs=1,
            max_train=100,
            hidden_dims=[8],
            latent_dim=2,
            batch_size=50,
            log_likelihood_samples=10,
            device="cpu",
        )
        measure = dict(
            grad_repeats=3, khat_points=4, khat_samples=20, posterior_points=1, posterior_draws=5
        )
    out = args.out or tempfile.mkdtemp(prefix="ppl-vae-compare-")
    result = compare_estimators(
        estimators,
        seeds,
        out=out,
        isolate=not args.in_process,
        overwrite=args.overwrite,
        quiet=args.smoke,
        **measure,
        **options,
    )
    print(result.markdown())
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":  # the runs start in fresh 'spawn'-ed processes: keep this guard
    sys.exit(run_command("compare_estimators.py", main))
