r"""Richer latent structure on digits: stacked layers, ladder, learned priors, a flow posterior.

Every row trains on the same data with the same x <-> z networks (hidden_dims 256,128) and the
same budget (Bernoulli likelihood, dynamic binarisation, ``trace``, 50 epochs by default), with
a 10-dimensional top latent layer; only the latent structure differs:

- ``gaussian``: the built-in VAE (``fit()``'s defaults);
- ``hierarchical2`` / ``hierarchical3``: ``--model hierarchical`` with L = 2 (z1 20, z2 10) and
  L = 3 (z1 40, z2 20, z3 10), bottom-up inference;
- ``ladder2``: ``--model ladder``, L = 2, the same widths as ``hierarchical2``;
- ``vamp``, ``mixture``, ``flow``: those priors with their default options;
- ``iaf``: ``--guide-family iaf`` with its default options, Gaussian prior.

Layer widths follow Burda et al.'s (2016) two-layer model (784-100-50 stochastic units, two
hidden layers of 100 between z1 and z2 against 200 between x and z1), fixed before any run and
not tuned on any split: the top layer is 10 wide as in the VAE, each layer below is twice the
width of the one above, and between two stochastic layers there are two hidden layers of 64
units (half the narrowest layer of the x <-> z1 network).

Prints one line per run, then Markdown tables: mean ± sd over seeds of test log p(x) (K
importance samples over all latent layers) and test ELBO, in nats per digit; active units (the
last epoch's count in ``metrics["latent"]``, Burda et al.'s Cov_x(E_q[z_d | x]) > 0.01 on the
validation split, summed over the latent sites, per site in brackets; marked † where that count
is not Burda's, see ``CAVEATS``); the last epoch's KL on the validation split, per site
(``kl_<site>`` in the history: the KL of a site below the top is to p(z_l | z_{l+1}));
seconds per epoch (``train_seconds / epochs`` on one torch thread); and log p(x) per seed.

    python benchmarks/latent_structure_digits.py --seeds 0,1,2
    python benchmarks/latent_structure_digits.py --rows gaussian,hierarchical2 --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from typing import Any

import torch

from ppl_vae import fit
from ppl_vae.cli import Parser, int_list, name_list, run_command
from ppl_vae.training.diagnostics import LatentCollapseWarning

TOP = 10  # the top layer (and the 1-layer models' latent_dim)
LAYER_HIDDEN = [64, 64]  # between two stochastic layers


def _stack(num_layers: int) -> list[int]:
    """``lower_latent_dims`` (bottom first) of an L-layer stack whose top is ``TOP`` wide and
    whose every layer is twice as wide as the one above: L = 3 gives [40, 20]."""
    return [TOP * 2 ** (num_layers - layer) for layer in range(1, num_layers)]


def _pair(model: str, num_layers: int) -> dict[str, Any]:
    return {
        "model": model,
        "model_args": {"lower_latent_dims": _stack(num_layers), "layer_hidden_dims": LAYER_HIDDEN},
    }


def _widths(num_layers: int) -> str:
    return "-".join(str(d) for d in [*_stack(num_layers), TOP])


#: row key -> (label, fit() options)
ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "gaussian": ("Gaussian, 1 layer (built-in VAE)", {}),
    "hierarchical2": (f"hierarchical L = 2, bottom-up ({_widths(2)})", _pair("hierarchical", 2)),
    "hierarchical3": (f"hierarchical L = 3, bottom-up ({_widths(3)})", _pair("hierarchical", 3)),
    "ladder2": (f"ladder L = 2 ({_widths(2)})", _pair("ladder", 2)),
    "vamp": ("VampPrior", {"prior": "vamp"}),
    "mixture": ("mixture-of-Gaussians prior", {"prior": "mixture"}),
    "flow": ("flow prior (MAF)", {"prior": "flow"}),
    "iaf": ("IAF posterior, Gaussian prior", {"guide_family": "iaf"}),
}


def run_one(key: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run of row ``key``; its numbers as a flat record."""
    _, options = ROWS[key]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LatentCollapseWarning)  # the table shows the units
        r = fit(
            latent_dim=TOP,
            epochs=args.epochs,
            seed=seed,
            binarize="dynamic",
            estimator=args.estimator,
            device=args.device,
            log_likelihood_samples=args.log_likelihood_samples,
            quiet=True,
            **options,
        )
    m = r.metrics
    latent = m.get("latent", {})
    return {
        "row": key,
        "seed": seed,
        "test_log_likelihood": m["test_log_likelihood"],
        "test_log_likelihood_se": m["test_log_likelihood_se"],
        "test_elbo": m["test_elbo"],
        "active_units": sum(s["active_units"] for s in latent.values()),
        "active_units_per_site": {name: s["active_units"] for name, s in latent.items()},
        "kl_per_site": {name: s["kl"] for name, s in latent.items()},
        "latent_dims_per_site": _site_dims(r.model, latent),
        "seconds_per_epoch": m["train_seconds"] / m["epochs"],
        "run_seconds": time.perf_counter() - t0,
    }


def _site_dims(model: Any, latent: dict[str, Any]) -> dict[str, int]:
    """Width of each latent site (``z`` for the VAE, ``z1``.. for the stacks)."""
    dims = getattr(model, "latent_dims", None)
    if dims is not None and not isinstance(dims, int):
        return {f"z{i}": int(d) for i, d in enumerate(dims, start=1) if f"z{i}" in latent}
    return {name: TOP for name in latent}


def fmt(v: list[float], digits: int = 2) -> str:
    if not v:
        return "-"
    s = f"{statistics.mean(v):.{digits}f}"
    return s + (f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else "")


def _per_site(recs: list[dict[str, Any]], field: str, width: bool) -> str:
    """Mean over seeds of ``field`` summed over sites (``of`` the total width if ``width``),
    then the per-site means in brackets when there are several sites."""
    if not recs[0][field]:
        return "-"
    sites = sorted(recs[0][field])
    total = statistics.mean(sum(r[field].values()) for r in recs)
    digits = 1 if width else 2
    out = f"{total:.{digits}f}"
    if width:
        out += f" of {sum(recs[0]['latent_dims_per_site'].values())}"
    if len(sites) > 1:
        means = (statistics.mean(r[field][s] for r in recs) for s in sites)
        out += " (" + ", ".join(f"{s} {m:.{digits}f}" for s, m in zip(sites, means)) + ")"
    return out


#: rows whose recorded active units are not Burda et al.'s count, and why
CAVEATS = {
    "iaf": "the IAF's q(z|x) has no closed-form mean: E_q[z|x] is the average of 8 guide "
    "draws with its Monte Carlo part removed (ppl_vae.training.diagnostics)",
    "ladder2": "z1's E_q[z1|x] averages over 8 guide draws of z2, Monte Carlo part removed",
}


def table(records: list[dict[str, Any]], keys: list[str], seeds: list[int]) -> str:
    """The Markdown tables of the module docstring."""
    lines = [
        "| latent structure | test log p(x), nats | test ELBO, nats | active units "
        "| KL, nats | s / epoch |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key in keys:
        recs = [r for r in records if r["row"] == key]
        mark = " †" if key in CAVEATS else ""
        lines.append(
            f"| {ROWS[key][0]} | {fmt([r['test_log_likelihood'] for r in recs])} "
            f"| {fmt([r['test_elbo'] for r in recs])} "
            f"| {_per_site(recs, 'active_units_per_site', True)}{mark} "
            f"| {_per_site(recs, 'kl_per_site', False)} "
            f"| {statistics.mean(r['seconds_per_epoch'] for r in recs):.3f} |"
        )
    notes = [f"† {ROWS[k][0]}: {CAVEATS[k]}." for k in keys if k in CAVEATS]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        "| latent structure | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for key in keys:
        by_seed = {r["seed"]: r["test_log_likelihood"] for r in records if r["row"] == key}
        lines.append(f"| {ROWS[key][0]} | " + " | ".join(f"{by_seed[s]:.2f}" for s in seeds) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = Parser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--rows", type=name_list(ROWS), default=",".join(ROWS), help=f"subset of {','.join(ROWS)}"
    )
    p.add_argument("--seeds", type=int_list, default="0,1,2")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--estimator", default="trace")
    p.add_argument("--log-likelihood-samples", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (s / epoch)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, K = 10")
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.log_likelihood_samples = 1, 10
    keys, seeds = args.rows, args.seeds
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    records = []
    for key in keys:
        for seed in seeds:
            rec = run_one(key, seed, args)
            records.append(rec)
            sites = ", ".join(
                f"{k} {v} (KL {rec['kl_per_site'][k]:.2f})"
                for k, v in sorted(rec["active_units_per_site"].items())
            )
            print(
                f"done {key} seed {seed}: log p(x) {rec['test_log_likelihood']:.2f} "
                f"(se {rec['test_log_likelihood_se']:.2f}), ELBO {rec['test_elbo']:.2f}, "
                f"active units {rec['active_units']} ({sites}), "
                f"{rec['seconds_per_epoch']:.3f} s/epoch, {rec['run_seconds']:.0f} s",
                flush=True,
            )
    total = time.perf_counter() - t0
    print(
        f"\nDigits, {args.epochs} epochs, Bernoulli, dynamic binarisation, estimator "
        f"{args.estimator}, K = {args.log_likelihood_samples}, seeds {seeds}, device "
        f"{args.device}, {args.threads} torch thread(s); nats per digit (higher is better); "
        f"total {total:.0f} s\n"
    )
    print(table(records, keys, seeds))
    for key in keys:
        if key != "gaussian" and "gaussian" in keys:
            base = {r["seed"]: r["test_log_likelihood"] for r in records if r["row"] == "gaussian"}
            diff = [r["test_log_likelihood"] - base[r["seed"]] for r in records if r["row"] == key]
            wins = sum(d > 0 for d in diff)
            print(
                f"\n{key} - gaussian, log p(x) per seed: "
                + ", ".join(f"{d:+.2f}" for d in diff)
                + f" (better on {wins} of {len(diff)} seeds)",
                end="",
            )
    print()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "total_seconds": total, "runs": records}, f, indent=1)
    return records


if __name__ == "__main__":
    sys.exit(run_command("latent_structure_digits.py", main))
