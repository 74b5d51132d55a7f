r"""Test log-likelihood on digits for every shipped prior at several latent sizes.

Prints a Markdown table (nats per digit, K importance samples) and, for spike-and-slab, the
fraction of exactly-zero codes among exact posterior samples of the test set.

    python benchmarks/priors_digits.py --epochs 50 --latent-dims 2,5,10 --seeds 0
"""

from __future__ import annotations

import statistics
import sys
import time

from ppl_vae import fit
from ppl_vae.cli import Parser, int_list, name_list, run_command
from ppl_vae.components import available


def vae_priors() -> list[str]:
    """Every shipped prior a VAE takes (a prior of the label, p(z|y), needs labels: M2 only)."""
    from ppl_vae.components import resolve

    return [p for p in available("prior") if not resolve(p, "prior").label_conditional]


def main(argv: list[str] | None = None) -> None:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument("--priors", type=name_list(vae_priors()), default=",".join(vae_priors()))
    p.add_argument("--latent-dims", type=int_list, default="2,5,10")
    p.add_argument("--seeds", type=int_list, default="0")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--estimator", default="trace")
    p.add_argument("--log-likelihood-samples", type=int, default=1000)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    priors, dims, seeds = args.priors, args.latent_dims, args.seeds
    rows = []
    for prior in priors:
        for d in dims:
            lls, elbos, zeros, secs = [], [], [], []
            for seed in seeds:
                t0 = time.perf_counter()
                r = fit(prior=prior, latent_dim=d, epochs=args.epochs, seed=seed,
                        estimator=args.estimator, device=args.device,
                        log_likelihood_samples=args.log_likelihood_samples, quiet=True)
                secs.append(time.perf_counter() - t0)
                lls.append(r.metrics["test_log_likelihood"])
                elbos.append(r.metrics["test_elbo"])
                if "zero_fraction" in r.metrics.get("prior_summary", {}):
                    zeros.append(r.metrics["prior_summary"]["zero_fraction"])
            rows.append((prior, d, lls, elbos, zeros, secs))
            print(f"done {prior} D={d}: log p(x) {statistics.mean(lls):.2f}", flush=True)

    def fmt(v: list[float]) -> str:
        if not v:
            return "-"
        return f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

    print(f"\nDigits, {args.epochs} epochs, estimator {args.estimator}, K = "
          f"{args.log_likelihood_samples}, seeds {seeds}; nats per digit (higher is better)\n")
    print("| prior | latent dim | test log p(x) | test ELBO | exact-zero codes | seconds per run |")
    print("|---|---:|---:|---:|---:|---:|")
    for prior, d, lls, elbos, zeros, secs in rows:
        print(f"| {prior} | {d} | {fmt(lls)} | {fmt(elbos)} | {fmt(zeros)} | {statistics.mean(secs):.0f} |")


if __name__ == "__main__":
    sys.exit(run_command("priors_digits.py", main))
