r"""Semi-supervised M2 on the offline digits: test accuracy with 50 / 100 / 300 labels.

For each number of labels and seed (the seed fixes the train/validation/test split, the
class-balanced labelled subset and the initialisation), trains the M2 model with each label
guide (``enumerate``, ``relaxed``, ``sample``) and the supervised baseline (the same classifier
network trained on the labelled subset alone, early-stopped on validation accuracy, with its own
tuned learning rate, dropout and budget), and prints a Markdown table of test accuracies (mean
and standard deviation over seeds) and seconds per epoch.

Target (issue 5): with ``enumerate`` at 50 labels, mean test accuracy over seeds 0, 1, 2
>= 0.85 and >= 6 points above the supervised baseline.

Tuning protocol (``--tune``; the defaults below are its result):

* Tuning seeds 10, 11, 12 only (other splits, labelled subsets and initialisations than the
  reporting seeds 0, 1, 2), 50 labels, criterion: the **validation** accuracy (144 held-out
  labelled points per seed) of the epoch the run keeps (its best validation epoch), averaged
  over the three seeds. Test accuracy is never computed into the tuning output.
* M2 (``enumerate``; the other guides and label counts reuse its settings untuned): the grid
  alpha in {1, 3, 10} x latent_dim in {4, 16} x lr in {3e-4, 1e-3}, batch 32, 50 epochs; the
  budget epochs in {25, 50} is read off the first 25 epochs of each run, which are exactly a
  25-epoch run (nothing is annealed with ``enumerate`` and a Gaussian prior).
* Supervised baseline, the same protocol on its own: lr in {3e-4, 1e-3, 3e-3} x dropout in
  {0, 0.25, 0.5}, budget {25, 50} epochs of as many labelled mini-batches of 32 as M2 takes
  steps (built and seeded exactly as ``fit_ssl(baseline="supervised")`` builds it).
* Choice: the highest mean; where means are within 0.005, the cheaper setting (fewer epochs;
  then the higher mean, then grid order).
  The grid's centre (latent 4, alpha 3, lr 3e-4, batch 32) is the setting an earlier version
  had picked by looking at seeds 0-2's test accuracy; the choice below is made on validation
  alone, and the test numbers were computed once, after it.

Result of ``--tune`` (mean validation accuracy over seeds 10-12; CPU, deterministic): M2
latent_dim 16, alpha 3, lr 3e-4, 50 epochs: 0.924 (next: 0.921; the old latent 4 / alpha 3 /
lr 3e-4 setting: 0.896 at 50 epochs, 0.891 at 25); baseline lr 1e-3, dropout 0.25, 25 epochs:
0.880 (range over its grid 0.866-0.880; with M2's lr 3e-4 and no dropout 0.870). The M2 grid
is 36 runs of 50 epochs (about 25 s of CPU each on one thread), the baseline grid 27 short runs.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ssl_digits.py --jobs 2             # the full table
    OMP_NUM_THREADS=1 python benchmarks/ssl_digits.py --labels 50 --guides enumerate
    OMP_NUM_THREADS=1 python benchmarks/ssl_digits.py --tune --jobs 2      # the tuning grid
    python benchmarks/ssl_digits.py --json results.json                   # also save raw numbers
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from ppl_vae.ssl import fit_ssl

#: The M2 settings chosen by ``--tune`` (validation accuracy, seeds 10-12; module docstring).
SETTINGS: dict[str, Any] = dict(
    data="digits",
    latent_dim=16,
    hidden_dims=[256, 128],
    alpha=3.0,
    lr=3e-4,
    epochs=50,
    batch_size=32,
    likelihood="discretized-logistic",
    elbo_samples=1,
)
#: The supervised baseline's own settings, chosen by ``--tune`` the same way.
BASELINE: dict[str, Any] = dict(baseline_lr=1e-3, baseline_dropout=0.25, baseline_epochs=25)

TUNE_SEEDS = (10, 11, 12)
TUNE_LABELS = 50
M2_GRID = dict(alpha=(1.0, 3.0, 10.0), latent_dim=(4, 16), lr=(3e-4, 1e-3))
BASELINE_GRID = dict(lr=(3e-4, 1e-3, 3e-3), dropout=(0.0, 0.25, 0.5))
TUNE_EPOCHS = (25, 50)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _map(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> list[Any]:
    """``map`` in ``workers`` fresh processes (one thread each), or here for ``workers == 1``."""
    if workers <= 1:
        return [fn(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=torch.set_num_threads,
                             initargs=(1,)) as ex:  # fmt: skip
        return list(ex.map(fn, jobs))


# -- tuning: validation accuracy only -------------------------------------------------------------
def _tune_m2(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
    """One M2 run on a tuning seed; only validation accuracies leave this function."""
    cfg, seed = job
    r = fit_ssl(
        {**SETTINGS, **cfg},
        labels=TUNE_LABELS,
        seed=seed,
        label_guide="enumerate",
        epochs=max(TUNE_EPOCHS),
        quiet=True,
        figures=False,
        device="cpu",
    )
    return {"cfg": cfg, "seed": seed, "val": [h["val_accuracy"] for h in r.history]}


def _tune_baseline(job: tuple[dict[str, Any], int]) -> dict[str, Any]:
    """The supervised baseline alone, built, seeded and fed exactly as ``fit_ssl`` does."""
    import pyro

    from ppl_vae.components import build as build_component
    from ppl_vae.data import load_data
    from ppl_vae.ssl import split_labelled, train_supervised

    cfg, seed = job
    pyro.set_rng_seed(seed)
    ds = load_data(SETTINGS["data"], val_fraction=0.1, test_fraction=0.2, seed=seed)
    assert ds.train_y is not None and ds.num_classes is not None
    labelled, unlabelled = split_labelled(ds.train_y, TUNE_LABELS, ds.num_classes, seed)
    idx = torch.as_tensor(labelled)
    batch = min(SETTINGS["batch_size"], len(labelled))
    pyro.set_rng_seed(seed + 7919)
    classifier = build_component(
        "enumerate",
        "label_guide",
        {
            "data_shape": ds.data_shape,
            "num_classes": ds.num_classes,
            "hidden_dims": tuple(SETTINGS["hidden_dims"]),
            "network": "auto",
        },
        {"dropout": cfg["dropout"]},
    )
    history, _ = train_supervised(
        classifier,
        ds.train_x[idx],
        ds.train_y[idx],
        ds.val_x,
        ds.val_y,
        epochs=max(TUNE_EPOCHS),
        steps_per_epoch=math.ceil(len(unlabelled) / SETTINGS["batch_size"]),
        batch_size=batch,
        lr=cfg["lr"],
        seed=seed,
    )
    return {"cfg": cfg, "seed": seed, "val": [h["val_accuracy"] for h in history]}


def _choose(records: list[dict[str, Any]], title: str) -> tuple[dict[str, Any], str]:
    """Mean over seeds of the kept epoch's validation accuracy for each (setting, budget)."""
    rows = []
    for key in dict.fromkeys(json.dumps(r["cfg"], sort_keys=True) for r in records):
        runs = [r for r in records if json.dumps(r["cfg"], sort_keys=True) == key]
        for epochs in TUNE_EPOCHS:
            val = statistics.mean(max(r["val"][:epochs]) for r in runs)
            rows.append((val, epochs, {**json.loads(key), "epochs": epochs}))
    top = max(v for v, _, _ in rows)
    best = min((r for r in rows if r[0] >= top - 0.005), key=lambda r: (r[1], -r[0]))
    lines = [f"{title}: mean validation accuracy over seeds {list(TUNE_SEEDS)}", ""]
    lines += ["| setting | epochs | validation accuracy |", "|---|---|---|"]
    for val, epochs, cfg in sorted(rows, key=lambda r: -r[0]):
        shown = {k: v for k, v in cfg.items() if k != "epochs"}
        mark = " **chosen**" if cfg == best[2] else ""
        lines.append(f"| {shown} | {epochs} | {val:.3f}{mark} |")
    return best[2], "\n".join(lines)


def tune(workers: int) -> dict[str, Any]:
    """Run both grids on the tuning seeds; print the validation tables and the choice."""
    grid = [dict(zip(M2_GRID, v, strict=True)) for v in itertools.product(*M2_GRID.values())]
    m2 = _map(_tune_m2, [(c, s) for c in grid for s in TUNE_SEEDS], workers)
    grid = [
        dict(zip(BASELINE_GRID, v, strict=True)) for v in itertools.product(*BASELINE_GRID.values())
    ]
    base = _map(_tune_baseline, [(c, s) for c in grid for s in TUNE_SEEDS], workers)
    m2_choice, m2_table = _choose(m2, "M2 (enumerate, 50 labels)")
    b_choice, b_table = _choose(base, "supervised baseline (50 labels)")
    print(m2_table, "\n", b_table, sep="\n")
    choice = {"m2": m2_choice, "baseline": b_choice}
    print("\nchosen:", json.dumps(choice))
    return {"choice": choice, "m2": m2, "baseline": base}


# -- the reported table: test accuracy on seeds 0, 1, 2 ------------------------------------------
def _report_run(job: tuple[int, int, str, bool, int]) -> list[dict[str, Any]]:
    n, seed, guide, with_baseline, epochs = job
    t0 = time.perf_counter()
    r = fit_ssl(
        {**SETTINGS, **BASELINE},
        labels=n,
        seed=seed,
        label_guide=guide,
        epochs=epochs,
        baseline="supervised" if with_baseline else None,
        quiet=True,
        figures=False,
        device="cpu",
    )
    m = r.metrics
    out = [
        {
            "labels": n,
            "seed": seed,
            "method": f"M2 ({guide})",
            "test_accuracy": m["test_accuracy"],
            "best_val_accuracy": m["best_val_accuracy"],
            "test_elbo": m["test_elbo"],
            "best_epoch": m["best_epoch"],
            "seconds_per_epoch": m["seconds_per_epoch"],
        }
    ]
    if "baseline_test_accuracy" in m:
        out.append(
            {
                "labels": n,
                "seed": seed,
                "method": "supervised baseline",
                "test_accuracy": m["baseline_test_accuracy"],
                "best_val_accuracy": m["baseline_best_val_accuracy"],
                "best_epoch": m["baseline_best_epoch"],
                "seconds_per_epoch": m["baseline_seconds"] / m["baseline_epochs_run"],
            }
        )
    print(
        f"labels={n} seed={seed} {guide}: M2 {m['test_accuracy']:.3f}"
        + (f", baseline {m['baseline_test_accuracy']:.3f}" if "baseline_test_accuracy" in m else "")
        + f" ({time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return out


def run(
    labels: Sequence[int],
    seeds: Sequence[int],
    guides: Sequence[str],
    epochs: int,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Train every (labels, seed, guide) and the baseline; return one record per run."""
    jobs = [
        (n, seed, guide, i == 0, epochs)
        for n in labels
        for seed in seeds
        for i, guide in enumerate(guides)
    ]
    return [rec for recs in _map(_report_run, jobs, workers) for rec in recs]


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(records: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    """The Markdown table: one row per (labels, method)."""
    head = (
        "| labels | method | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | mean ± sd | s / epoch |\n|---|---|"
        + "---|" * len(seeds)
        + "---|---|"
    )
    lines = [head]
    keys = list(dict.fromkeys((r["labels"], r["method"]) for r in records))
    for n, method in keys:
        rows = {r["seed"]: r for r in records if r["labels"] == n and r["method"] == method}
        accs = [rows[s]["test_accuracy"] for s in seeds if s in rows]
        cells = [f"{rows[s]['test_accuracy']:.3f}" if s in rows else "-" for s in seeds]
        spe = statistics.mean(rows[s]["seconds_per_epoch"] for s in rows)
        lines.append(
            f"| {n} | {method} | " + " | ".join(cells) + f" | {_mean_sd(accs)} | {spe:.2f} |"
        )
    return "\n".join(lines)


def target(records: list[dict[str, Any]]) -> str:
    m2 = [
        r["test_accuracy"] for r in records if r["labels"] == 50 and r["method"] == "M2 (enumerate)"
    ]
    sup = [
        r["test_accuracy"]
        for r in records
        if r["labels"] == 50 and r["method"] == "supervised baseline"
    ]
    if not m2 or not sup:
        return "target (50 labels, enumerate vs supervised): not measured in this run"
    a, b = statistics.mean(m2), statistics.mean(sup)
    ok = a >= 0.85 and a - b >= 0.06
    return (
        f"target (50 labels): M2 (enumerate) mean {a:.3f} (>= 0.85: {a >= 0.85}), "
        f"{100 * (a - b):+.1f} points over the supervised baseline {b:.3f} (>= +6: {a - b >= 0.06}) "
        f"-> {'met' if ok else 'NOT met'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="M2 on digits: accuracy vs labels")
    parser.add_argument(
        "--labels", type=_ints, default=[50, 100, 300], help="comma list (default 50,100,300)"
    )
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma list (default 0,1,2)")
    parser.add_argument(
        "--guides", default="enumerate,relaxed,sample", help="comma list (default all three)"
    )
    parser.add_argument("--epochs", type=int, default=SETTINGS["epochs"], help="epochs per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="run the validation-only tuning grids on seeds 10-12 instead (module docstring)",
    )
    parser.add_argument("--json", help="write the raw records to this file")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.tune:
        result = tune(args.jobs)
        print(f"total {time.perf_counter() - t0:.0f} s")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
        return 0
    guides = [g for g in args.guides.split(",") if g]
    records = run(args.labels, args.seeds, guides, args.epochs, args.jobs)
    settings = {**SETTINGS, **BASELINE, "epochs": args.epochs}
    print(
        f"M2 on digits (1,797 images: 1,294 train / 144 validation / 359 test per seed), "
        f"settings {settings}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"1 thread per run, {args.jobs} run(s) in parallel; total {time.perf_counter() - t0:.0f} s\n"
    )
    print(table(records, args.seeds))
    print()
    print(target(records))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "records": records}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
