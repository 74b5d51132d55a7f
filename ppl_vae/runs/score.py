r"""Anomaly scoring of a trained run: per-point log p(x), ELBO, reconstruction term, KL and
bits/dim for any data of the run's shape, with AUROC/AUPRC against inlier/outlier labels.

For each point x (nats; higher is more typical, except the KL):

.. math:: \log \hat p(x) = \operatorname{logsumexp}_k \log w_k - \log K, \quad
    \mathrm{ELBO}(x) = \tfrac1K \textstyle\sum_k \log w_k, \quad
    \mathrm{recon}(x) = \mathbb{E}_q[\log p(x \mid z)], \quad \mathrm{KL}(x) = \sum_s
    \mathrm{KL}_s(x)

(:func:`ppl_vae.inference.scoring.score` and :func:`~ppl_vae.inference.scoring.per_point_terms`).
The anomaly score of each is oriented so that higher means more anomalous: :math:`-\log \hat
p(x)`, :math:`-\mathrm{ELBO}`, the reconstruction error :math:`-\mathrm{recon}` and the KL.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ..config import FitConfig, write_text_atomic
from ..data import DATASETS, load_data
from ..inference.scoring import (
    DEFAULT_EVAL_MEMORY,
    Scores,
    Terms,
    bits_per_dim,
    parse_memory,
    per_point_terms,
    score,
)
from ..models.errors import ConfigError
from ..training.setup import prepare_data
from .reopen import Run, load_run

__all__ = [
    "ANOMALY_SCORES",
    "SPLITS",
    "TERM_SAMPLES",
    "anomaly_metrics",
    "outlier_labels",
    "score_data",
    "score_run",
]

#: ``--data`` values that mean a split of the run's own data.
SPLITS = ("test", "val")
#: Draws per point of the reconstruction term and the Monte Carlo KLs.
TERM_SAMPLES = 100
#: Anomaly scores: (CSV column, sign) with score = sign * column, higher = more anomalous.
ANOMALY_SCORES: dict[str, tuple[str, float]] = {
    "log_likelihood": ("log_likelihood", -1.0),
    "elbo": ("elbo", -1.0),
    "reconstruction_error": ("recon", -1.0),
    "kl": ("kl", 1.0),
}


def score_data(run: Run, data: str) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The points ``data`` names, as the run evaluates test points, with their class labels.

    ``data`` is ``"test"`` or ``"val"`` (the run's own split, exactly as ``evaluate`` scores
    it), a named data set (its test split, from the run's ``data_root``; never downloaded) or a
    ``.npy``/``.npz`` file (labels ``y`` optional). New data are scaled like the run's (uint8
    divided by 255, other dtypes kept), must have the run's per-point shape (or as many
    values per point, e.g. 8x8 images for flat 64-dim digits), and are binarised as the run
    binarises its test split.

    Returns:
        ``(x (N, *data_shape) on the run's device, labels (N,) or None, description)``.
    """
    cfg, ds, model = run.config, run.dataset, run.model
    if not isinstance(cfg, FitConfig):
        raise ConfigError(f"run {str(run.run_dir)!r} is of kind {run.kind!r}; expected vae or user")
    with pyro.settings.context(module_local_params=True):
        _, val, test, dynamic = prepare_data(ds, model, cfg.binarize, cfg.split_seed)
    if data in SPLITS:
        x, y = (test, ds.test_y) if data == "test" else (val, ds.val_y)
        source = cfg.test_data if data == "test" and cfg.test_data else cfg.data
        return x, y, f"{source} ({data} split)"
    binarize = "static" if cfg.binarize == "static" else "none"
    if data.strip().lower() in DATASETS:
        other = load_data(data, root=cfg.data_root, binarize=binarize, seed=cfg.split_seed)
        what = f"{data} (test split)"
    else:
        if not Path(data).expanduser().is_file():
            raise ConfigError(
                f"--data must be {' or '.join(repr(s) for s in SPLITS)} (the run's own split), "
                f"a data set name ({', '.join(DATASETS)}) or an existing .npy/.npz file, got "
                f"{data!r}"
            )
        other = load_data(
            data, test_data=data, binarize=binarize, val_fraction=0.0, seed=cfg.split_seed
        )
        what = str(data)
    new_x, shape = other.test_x, tuple(ds.data_shape)
    if tuple(new_x.shape[1:]) != shape:
        if math.prod(new_x.shape[1:]) != math.prod(shape):
            raise ConfigError(
                f"data {what} have points of shape {tuple(new_x.shape[1:])} but run "
                f"{str(run.run_dir)!r} was trained on points of shape {shape}"
            )
        new_x = new_x.reshape(new_x.shape[0], *shape)
    if dynamic and not bool(((new_x >= 0) & (new_x <= 1)).all()):
        raise ConfigError(
            f"data {what} take values in [{float(new_x.min()):.4g}, {float(new_x.max()):.4g}] but "
            f"run {str(run.run_dir)!r} binarises its data, which must lie in [0, 1] (uint8 files "
            "are divided by 255, other dtypes kept as they are)"
        )
    levels = ds.num_levels
    if not dynamic and cfg.binarize != "static" and levels is not None:
        grid = new_x * (levels - 1)
        on_grid = bool(((grid - grid.round()).abs() < 1e-4).all())
        if not (on_grid and bool(((new_x >= 0) & (new_x <= 1)).all())):
            raise ConfigError(
                f"data {what} do not lie on the run's grid of {levels} levels in [0, 1] (the "
                f"run's data {ds.name!r} do): uint8 files are divided by 255, other dtypes kept "
                "as they are, so store them like the training data"
            )
    dev = ds.train_x.device
    ds_new = replace(ds, test_x=new_x.to(dev), test_y=None)
    with pyro.settings.context(module_local_params=True):
        x = prepare_data(ds_new, model, cfg.binarize, cfg.split_seed)[2]
    y = other.test_y
    return x, None if y is None else y.to(dev), what


def outlier_labels(
    num_points: int,
    labels: str | np.ndarray | None = None,
    outlier_classes: list[int] | None = None,
    class_labels: torch.Tensor | None = None,
) -> np.ndarray | None:
    """0/1 per point (1 = outlier) from a file or array of 0/1 (``labels``), or from the
    points' class labels and a list of outlier classes; None when neither is given."""
    if labels is not None and outlier_classes is not None:
        raise ConfigError("give --labels or --outlier-classes, not both")
    if labels is None and outlier_classes is None:
        return None
    if labels is not None:
        what = "labels" if isinstance(labels, np.ndarray) else f"labels file {labels!r}"
        arr = labels if isinstance(labels, np.ndarray) else _read_labels(labels)
        arr = np.asarray(arr).reshape(-1) if np.ndim(arr) == 2 and 1 in np.shape(arr) else arr
        if arr.ndim != 1 or len(arr) != num_points:
            raise ConfigError(
                f"{what} must hold one 0/1 value per point ({num_points}), got shape {arr.shape}"
            )
        if not np.isin(arr, (0, 1)).all():
            bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
            raise ConfigError(f"{what} must be 0 (inlier) or 1 (outlier), got values {bad}")
        return arr.astype(np.int64)
    if class_labels is None:
        raise ConfigError(
            "--outlier-classes needs class labels: score the run's own split of labelled data "
            "or a .npz file with labels 'y' (or pass --labels with 0/1 per point)"
        )
    y = class_labels.cpu().numpy()
    present = set(np.unique(y).tolist())
    missing = [c for c in outlier_classes if c not in present]
    if missing:
        raise ConfigError(
            f"outlier classes {missing} do not occur in the data (classes present: "
            f"{sorted(present)})"
        )
    return np.isin(y, outlier_classes).astype(np.int64)


def _read_labels(path: str) -> np.ndarray:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"labels file {path!r} does not exist")
    try:
        if p.suffix.lower() == ".npy":
            return np.load(p, allow_pickle=False)
        return np.loadtxt(p, delimiter="," if p.suffix.lower() == ".csv" else None)
    except Exception as exc:  # ValueError, OSError, ...
        raise ConfigError(f"could not read labels file {path!r}: {exc}") from exc


def anomaly_metrics(outlier: np.ndarray, columns: dict[str, np.ndarray]) -> dict[str, Any]:
    """AUROC and AUPRC (average precision) of each anomaly score of :data:`ANOMALY_SCORES`
    (``sklearn.metrics``), outliers the positive class."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    n_out = int(outlier.sum())
    if n_out == 0 or n_out == len(outlier):
        raise ConfigError(
            f"AUROC needs inliers and outliers, got {n_out} outliers among {len(outlier)} points"
        )
    out: dict[str, Any] = {}
    for name, (column, sign) in ANOMALY_SCORES.items():
        s = sign * columns[column]
        out[name] = {
            "auroc": float(roc_auc_score(outlier, s)),
            "auprc": float(average_precision_score(outlier, s)),
        }
    return out


def score_run(
    run_dir: str | Path,
    data: str = "test",
    *,
    labels: str | np.ndarray | None = None,
    outlier_classes: list[int] | None = None,
    num_samples: int | None = None,
    term_samples: int = TERM_SAMPLES,
    eval_memory: int | str | None = DEFAULT_EVAL_MEMORY,
    device: str = "auto",
    seed: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
    figures: bool = True,
) -> dict[str, Any]:
    r"""Score ``data`` under a run and write ``scores.csv``, ``summary.json`` (and, with
    labels, ``histograms.png``) into ``out`` (default ``RUN_DIR/score-<data>``).

    Args:
        run_dir: a run directory of kind ``vae`` or ``user`` (M2 runs: ``ppl-vae evaluate``).
        data: see :func:`score_data`.
        labels: 0/1 per point (1 = outlier): a ``.npy``/text file or an array.
        outlier_classes: classes counted as outliers (needs class labels in ``data``).
        num_samples: K importance samples per point (default: the run's
            ``log_likelihood_samples``).
        term_samples: draws per point for the reconstruction term (and Monte Carlo KLs).
        eval_memory: memory budget of one pass (see :func:`~ppl_vae.inference.scoring.score`).
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: the random seed (default: the run's; with it, ``--data test`` gives the log p(x)
            of ``ppl-vae evaluate``).
        out: the output directory; an existing one that is not empty is an error unless
            ``overwrite``.
        progress: progress bars (on a terminal only).
        figures: write the histogram figure when there are labels.

    Returns:
        The summary written to ``summary.json``.
    """
    for name, v in (("num_samples", num_samples), ("term_samples", term_samples)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"`{name}` must be a positive integer, got {v!r}")
    if eval_memory is not None:
        eval_memory = parse_memory(eval_memory)
    if outlier_classes is not None and not outlier_classes:
        raise ConfigError("--outlier-classes needs at least one class, e.g. --outlier-classes 9")
    run_dir = Path(run_dir)
    kind = _kind(run_dir)
    if kind == "m2":
        raise ConfigError(
            f"run {str(run_dir)!r} is an M2 run; `ppl-vae score` scores kinds vae and user "
            "(for M2, `ppl-vae evaluate RUN --test-data FILE` writes per-point ELBO and log p(x) "
            "with y summed out)"
        )
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).stem if data not in SPLITS else data)
    out_dir = Path(out) if out is not None else run_dir / f"score-{tag}"
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ConfigError(f"{str(out_dir)!r} exists; pass --overwrite to replace it")
    run = load_run(run_dir, device=device)
    cfg = run.config
    assert isinstance(cfg, FitConfig)
    x, y, what = score_data(run, data)
    outlier = outlier_labels(x.shape[0], labels, outlier_classes, y)
    k = num_samples if num_samples is not None else cfg.log_likelihood_samples
    seed = cfg.seed if seed is None else seed
    pyro.set_rng_seed(seed)
    with pyro.settings.context(module_local_params=True):
        scores: Scores = score(
            run.model,
            x,
            num_samples=k,
            chunk_size=cfg.log_likelihood_chunk,
            eval_memory=eval_memory,
            progress=progress,
        )
        terms: Terms = per_point_terms(run.model, x, term_samples, scores.plan, progress)
    columns = _columns(run, scores, terms)
    summary = _summary(run, what, scores, terms, columns, seed)
    if outlier is not None:
        summary["outliers"] = {
            "num_outliers": int(outlier.sum()),
            "num_inliers": int(len(outlier) - outlier.sum()),
            "outlier_classes": outlier_classes,
            "labels": None if labels is None or isinstance(labels, np.ndarray) else str(labels),
        }
        summary["anomaly"] = anomaly_metrics(outlier, columns)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "scores.csv", columns, y, outlier)
    summary["files"] = {"scores": str(out_dir / "scores.csv")}
    if outlier is not None and figures:
        try:
            summary["files"]["histograms"] = str(
                histogram_figure(out_dir / "histograms.png", outlier, columns, summary["anomaly"])
            )
        except Exception as e:  # a figure never fails the scoring
            summary["figures_error"] = f"{type(e).__name__}: {e}"
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _kind(run_dir: Path) -> str:
    from ..config import run_kind

    if not (run_dir / "config.toml").is_file():
        return "missing"  # load_run says what is wrong
    return run_kind(run_dir / "config.toml")


def _columns(run: Run, scores: Scores, terms: Terms) -> dict[str, np.ndarray]:
    cols = {
        "log_likelihood": scores.log_likelihood.double().cpu().numpy(),
        "elbo": scores.elbo.double().cpu().numpy(),
        "recon": terms.recon.double().cpu().numpy(),
        "kl": terms.kl_total.double().cpu().numpy(),
    }
    if len(terms.kl) > 1:
        for name, value in terms.kl.items():
            cols[f"kl_{name}"] = value.double().cpu().numpy()
    lik = getattr(run.model, "likelihood", None)
    offset = bits_per_dim(lik, 0.0, run.dataset.num_levels) if lik is not None else None
    if offset is not None:
        dims = math.prod(run.dataset.data_shape)
        cols["bits_per_dim"] = -cols["log_likelihood"] / (dims * math.log(2)) + offset
    return cols


def _summary(
    run: Run,
    what: str,
    scores: Scores,
    terms: Terms,
    columns: dict[str, np.ndarray],
    seed: int,
) -> dict[str, Any]:
    n = len(columns["log_likelihood"])
    ll = columns["log_likelihood"]
    means = {name: float(v.mean()) for name, v in columns.items()}
    return {
        "run": str(run.run_dir),
        "kind": run.kind,
        "epoch": run.epoch,
        "weights": run.weights,
        "data": what,
        "num_points": n,
        "units": "nats per data point (bits_per_dim: bits per dimension)",
        "mean": means,
        "log_likelihood_se": float(ll.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "log_likelihood_samples": scores.num_samples,
        "term_samples": terms.num_samples,
        "kl_method": {s: "analytic" if a else "monte carlo" for s, a in terms.analytic.items()},
        "seed": seed,
        "chunk": scores.plan.as_dict() if scores.plan is not None else None,
        "anomaly_scores": {
            name: f"{'-' if sign < 0 else ''}{col} (higher = more anomalous)"
            for name, (col, sign) in ANOMALY_SCORES.items()
        },
    }


def _write_csv(
    path: Path,
    columns: dict[str, np.ndarray],
    labels: torch.Tensor | None,
    outlier: np.ndarray | None,
) -> None:
    import csv

    names = list(columns)
    n = len(columns[names[0]])
    lab = labels.cpu().tolist() if labels is not None else [""] * n
    outl = outlier.tolist() if outlier is not None else [""] * n
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "label", "outlier", *names])
    for i in range(n):
        w.writerow([i, lab[i], outl[i], *(f"{columns[c][i]:.6f}" for c in names)])
    write_text_atomic(path, buf.getvalue())


def histogram_figure(
    path: Path, outlier: np.ndarray, columns: dict[str, np.ndarray], metrics: dict[str, Any]
) -> Path:
    """Inlier and outlier histograms of each anomaly score, one panel per score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    inl, outl = outlier == 0, outlier == 1
    for ax, (name, (column, sign)) in zip(axes, ANOMALY_SCORES.items(), strict=True):
        s = sign * columns[column]
        lo, hi = np.percentile(s, [0.5, 99.5])
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
        ax.hist(np.clip(s[inl], lo, hi), bins=bins, alpha=0.6, density=True, label="inliers")
        ax.hist(np.clip(s[outl], lo, hi), bins=bins, alpha=0.6, density=True, label="outliers")
        m = metrics[name]
        ax.set_title(f"{name}: AUROC {m['auroc']:.3f}, AUPRC {m['auprc']:.3f}", fontsize=10)
        ax.set_xlabel(f"{'-' if sign < 0 else ''}{column}")
        ax.legend(fontsize=8)
    fig.suptitle(f"anomaly scores: {int(inl.sum())} inliers, {int(outl.sum())} outliers")
    fig.savefig(path, dpi=100)
    return path
