r"""Test log-likelihood on digits for each likelihood, on the data each one models.

``bernoulli`` models binarised digits (dynamic binarisation in training, a fixed binarised test
set); ``discretized-logistic`` models the raw 17-level digits as a probability mass function;
``continuous-bernoulli`` and ``normal`` model the raw values in [0, 1] as densities. Masses and
densities are not on the same scale (a density on [0, 1] can exceed 1), so compare rows of the
same kind; bits per dimension are given for the two probability mass functions.

    python benchmarks/likelihoods_digits.py --epochs 50 --seeds 0,1,2
    python benchmarks/likelihoods_digits.py --seeds 0,1,2 --only normal   # the normal rows only

The Normal's scale starts at the training data's pooled standard deviation unless
``init_scale`` is given (see ``ppl_vae.models.likelihoods._loc_scale``).
"""

from __future__ import annotations

import statistics
import sys

from ppl_vae import fit
from ppl_vae.cli import Parser, int_list, run_command
from ppl_vae.models.likelihoods.units import bits_per_dim

RUNS = [
    ("bernoulli", {}, "binarised (dynamic)", "mass"),
    ("discretized-logistic", {}, "raw, 17 levels", "mass"),
    ("continuous-bernoulli", {}, "raw, [0, 1]", "density"),
    ("normal", {"scale": "shared"}, "raw, [0, 1]", "density"),
    ("normal", {"scale": "per-element"}, "raw, [0, 1]", "density"),
]


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--seeds", type=int_list, default="0")
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--log-likelihood-samples", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default="", help="comma-separated likelihood names to run (default: all)")
    args = p.parse_args(argv)
    seeds = args.seeds
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    rows = []
    for name, lik_args, data, kind in RUNS:
        if only and name not in only:
            continue
        lls = []
        for seed in seeds:
            r = fit(likelihood=name, likelihood_args=lik_args, epochs=args.epochs, seed=seed,
                    latent_dim=args.latent_dim, device=args.device,
                    log_likelihood_samples=args.log_likelihood_samples, quiet=True)
            lls.append(r.metrics["test_log_likelihood"])
        mean = statistics.mean(lls)
        sd = statistics.stdev(lls) if len(lls) > 1 else float("nan")
        bpd = bits_per_dim(-mean, 64, None) if kind == "mass" else None
        label = name + (f" ({lik_args['scale']} scale)" if lik_args else "")
        rows.append((label, data, kind, mean, sd, bpd))
        print(f"done {label}: {mean:.2f}", flush=True)
    print(f"\nDigits, {args.epochs} epochs, latent dim {args.latent_dim}, trace, K = "
          f"{args.log_likelihood_samples}, seeds {seeds}; nats per digit (higher is better)\n")
    print("| likelihood | data | log p(x) is a | test log p(x) | bits/dim |")
    print("|---|---|---|---:|---:|")
    for label, data, kind, mean, sd, bpd in rows:
        spread = f" ± {sd:.2f}" if sd == sd else ""
        print(f"| {label} | {data} | {kind} | {mean:.2f}{spread} | {'' if bpd is None else f'{bpd:.3f}'} |")


if __name__ == "__main__":
    sys.exit(run_command("likelihoods_digits.py", main))
