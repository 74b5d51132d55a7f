r"""Reopening a run directory: its config, data split and trained model, for evaluation and sampling.

A run directory records its model kind in ``config.toml`` (:func:`ppl_vae.config.run_kind`);
:func:`load_run` and :func:`evaluate` dispatch on it:

- ``vae`` and ``user``: the :class:`~ppl_vae.vae.VAE` (or the user's pair) its config builds,
  with the best-validation weights the run evaluated (``best.pt``); evaluation reports the test
  ELBO and the importance-sampled log-likelihood.
- ``m2``: the :class:`~ppl_vae.ssl.SSVAE`, rebuilt by :func:`ppl_vae.ssl.build_ssl_run` exactly as
  the run built it (same split by the config's seed, same labelled subset, same networks), with
  the best-validation weights the run evaluated (``best.pt``); evaluation reports accuracy, the
  unlabelled ELBO and the importance-sampled log-likelihood, y summed out exactly in both.

A run whose weights do not fit the model its config builds is a one-line :class:`ConfigError`;
weights are never loaded into another architecture.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from ..config import ConfigFile, FitConfig, load_run_config, run_kind, write_text_atomic
from ..data import Dataset, load_data
from ..inference.scoring import (
    DEFAULT_EVAL_MEMORY,
    Scores,
    bits_per_dim,
    score,
    write_scores_csv,
)
from ..models.errors import ConfigError
from ..train import (
    build_config_model,
    build_config_vae,
    load_config_data,
    prepare_data,
    resolve_device,
)
from ..training import checkpoint as ckpt
from ..vae import VAE

__all__ = ["Run", "evaluate", "load_run"]


@dataclass
class Run:
    """A trained run loaded from its directory.

    Attributes:
        run_dir: the directory.
        config: its config (:class:`~ppl_vae.FitConfig` for ``vae`` runs,
            :class:`~ppl_vae.ssl.SSLConfig` for ``m2`` runs).
        model: the trained module, in eval mode (:attr:`vae` is the same module for VAE runs).
        dataset: the data set, split as the run split it, on :attr:`device`.
        epoch: the epoch whose weights were loaded.
        device: where the model and the data are.
        kind: the model kind the config records (``"vae"``, ``"m2"``, ``"user"``).
        weights: the file the weights came from and which weights they are.
        labelled: M2: indices of the labelled training points (None for other kinds).
        test_x: M2: the test data as the run evaluates them (binarised once where the run
            binarises dynamically); None for other kinds.
    """

    run_dir: Path
    config: ConfigFile
    model: torch.nn.Module
    dataset: Dataset
    epoch: int
    device: torch.device
    kind: str = "vae"
    weights: str = ckpt.CHECKPOINT
    labelled: np.ndarray | None = None
    test_x: torch.Tensor | None = None

    @property
    def vae(self) -> VAE:
        """The :class:`~ppl_vae.vae.VAE` of a VAE run (other kinds: use :attr:`model`)."""
        if not isinstance(self.model, VAE):
            raise AttributeError(
                f"run {str(self.run_dir)!r} is a run of kind {self.kind!r}, not a VAE; its module "
                "is `.model`"
            )
        return self.model


def load_run(run_dir: str | Path, device: str = "auto", test_data: str | None = None) -> Run:
    """Rebuild the model of a run from ``config.toml`` and load its trained weights.

    The data split is rebuilt from the config (same seed, same split). ``test_data`` replaces
    the test split with another file (e.g. for anomaly scoring). Every kind loads the
    best-validation weights its run evaluated (``best.pt``; without it, the checkpoint's copy of
    them; a run written before best weights were kept: its last checkpoint).

    Raises:
        ConfigError: a missing directory or config, a config of an unknown kind, a checkpoint
            that is missing, corrupted or does not fit the model the config builds.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a ppl-vae run directory (no config.toml)")
    kind = run_kind(run_dir / "config.toml")
    loader = _LOADERS.get(kind)
    if loader is None:
        raise ConfigError(
            f"run {str(run_dir)!r} is of model kind {kind!r}, which `ppl-vae evaluate` and "
            f"`ppl-vae sample` cannot reopen yet (they reopen kinds {sorted(_LOADERS)})"
        )
    dev = resolve_device(device)
    with pyro.settings.context(module_local_params=True):
        run = loader(run_dir, dev, test_data)
    run.model.to(dev).eval()
    return run


def _load_vae_run(run_dir: Path, dev: torch.device, test_data: str | None) -> Run:
    cfg = FitConfig.load(run_dir / "config.toml")
    ds = load_config_data(cfg, test_data=test_data, download=False)
    vae = build_config_vae(cfg, ds)
    epoch, where = _load_evaluated_weights(run_dir, vae, dev)
    return Run(run_dir, cfg, vae, ds.to(dev), epoch, dev, "vae", where)


def _load_m2_run(run_dir: Path, dev: torch.device, test_data: str | None) -> Run:
    from ..ssl import SSLConfig, build_ssl_run

    cfg = load_run_config(run_dir / "config.toml")
    assert isinstance(cfg, SSLConfig)
    built = build_ssl_run(cfg, device=dev, download=False, saved=True)
    ds, test_x = built.dataset, built.splits[2]
    if test_data is not None:
        ds, test_x = _replace_test_split(built, test_data)
    best = run_dir / ckpt.BEST
    if best.exists():
        state = ckpt.load_state_file(best, dev)
        where = f"{ckpt.BEST} (best validation accuracy)"
        ckpt.load_model_state(built.model, state, repr(str(best)))
    else:
        # best.pt is written before every checkpoint that records a better epoch, so this is a
        # directory whose best.pt was removed: the checkpoint keeps a copy of the best weights.
        state = ckpt.load_checkpoint(run_dir, map_location=dev)
        if "best_model" not in state:
            raise ConfigError(
                f"run {str(run_dir)!r} has no {ckpt.BEST} and its checkpoint holds no "
                "best-validation weights, so the weights the run evaluated are not there"
            )
        where = f"{ckpt.CHECKPOINT} (its copy of the best-validation weights)"
        state = {
            "model": state["best_model"],
            "architecture": state.get("architecture"),
            "epoch": state.get("best_epoch", state["epoch"]),
        }
        ckpt.load_model_state(built.model, state, repr(str(run_dir / ckpt.CHECKPOINT)))
    return Run(
        run_dir,
        built.config,
        built.model,
        ds,
        int(state["epoch"]),
        dev,
        "m2",
        where,
        built.labelled,
        test_x,
    )


def _load_user_run(run_dir: Path, dev: torch.device, test_data: str | None) -> Run:
    cfg = FitConfig.load(run_dir / "config.toml")
    ds = load_config_data(cfg, test_data=test_data, download=False)
    module = build_config_model(cfg, ds)
    epoch, where = _load_evaluated_weights(run_dir, module, dev)
    return Run(run_dir, cfg, module, ds.to(dev), epoch, dev, "user", where)


def _load_evaluated_weights(
    run_dir: Path, module: torch.nn.Module, dev: torch.device
) -> tuple[int, str]:
    """Load the weights the run evaluated into ``module``: ``best.pt`` (the best validation
    epoch), else the checkpoint's copy of them, else (a run written before best weights were
    kept) the checkpoint's own; return their epoch and where they came from."""
    best = run_dir / ckpt.BEST
    if best.exists():
        state = ckpt.load_state_file(best, dev)
        ckpt.load_model_state(module, state, repr(str(best)))
        return int(state.get("best_epoch", state["epoch"])), f"{ckpt.BEST} (best validation ELBO)"
    state = ckpt.load_checkpoint(run_dir, map_location=dev)
    if "best_model" in state:
        weights = {
            "model": state["best_model"],
            "architecture": state.get("architecture"),
            "epoch": state.get("best_epoch", state["epoch"]),
        }
        ckpt.load_model_state(module, weights, repr(str(run_dir / ckpt.CHECKPOINT)))
        return int(weights["epoch"]), f"{ckpt.CHECKPOINT} (its copy of the best-validation weights)"
    ckpt.load_model_state(module, state, repr(str(run_dir)))
    return int(state["epoch"]), f"{ckpt.CHECKPOINT} (the last epoch)"


_LOADERS: dict[str, Callable[[Path, torch.device, str | None], Run]] = {
    "vae": _load_vae_run,
    "m2": _load_m2_run,
    "user": _load_user_run,
}


def _replace_test_split(built: Any, test_data: str) -> tuple[Dataset, torch.Tensor]:
    """The run's data set with its test split replaced by the file ``test_data``, and the test
    points as the run would evaluate them (checked against the model; binarised like the run's).

    The file is scaled as the run's data were (same dtype rule), and must have the per-point
    shape the networks were built for; labels (``y`` in a ``.npz``) are optional.
    """
    cfg, ds, model = built.config, built.dataset, built.model
    # The whole file is the test split: it is read as the "test data" of itself, so it is scaled
    # and binarised (static: the test split's stream) exactly as a test file of a run is.
    other = load_data(
        test_data,
        test_data=test_data,
        binarize="static" if cfg.binarize == "static" else "none",
        val_fraction=0.0,
        seed=cfg.seed,
    )
    if other.num_levels != ds.num_levels and cfg.binarize != "static":
        # A float file is kept as it is: fine if its values lie on the run's grid of levels.
        levels = ds.num_levels
        on_grid = (
            other.num_levels is None
            and levels is not None
            and bool(((other.test_x * (levels - 1)).round() == other.test_x * (levels - 1)).all())
            and bool(((other.test_x >= 0) & (other.test_x <= 1)).all())
        )
        if not on_grid:
            raise ConfigError(
                f"test data {test_data!r} take {other.num_levels or 'continuous'} levels but "
                f"the run's data {ds.name!r} take {ds.num_levels or 'continuous'} levels in "
                f"[0, 1], so they would not be scaled alike (uint8 files are divided by 255, "
                "other dtypes kept as they are)"
            )
    y = other.test_y
    k = model.num_classes
    if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ConfigError(
            f"labels of test data {test_data!r} must be in [0, {k}), got values in "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    dev = ds.train_x.device
    ds = replace(ds, test_x=other.test_x.to(dev), test_y=None if y is None else y.to(dev))
    test_x = prepare_data(ds, model, cfg.binarize, cfg.split_seed)[2]
    return ds, test_x


def evaluate(
    run_dir: str | Path,
    num_samples: int | None = None,
    device: str = "auto",
    test_data: str | None = None,
    write: bool = True,
    eval_memory: int | str | None = DEFAULT_EVAL_MEMORY,
    progress: bool = False,
) -> dict[str, Any]:
    r"""Evaluate a run on its test split (or ``test_data``), in nats per data point.

    - ``vae`` runs: test ELBO and importance-sampled log-likelihood, ``num_samples`` (K)
      samples per point (default: the run's ``log_likelihood_samples``).
    - ``m2`` runs: the best-validation weights the run evaluated; with labels, ``test_accuracy``
      and ``per_class_accuracy`` (they reproduce the run's exactly: the classifier is
      deterministic), and always ``test_elbo`` (the unlabelled bound, ``elbo_samples`` z per
      class) and ``test_log_likelihood``, both with y summed out exactly:

      .. math:: \log \hat p(x) = \operatorname{logsumexp}_k \log \tfrac1K \sum_{s=1}^{K}
          \frac{p(k)\, p(z_s)\, p(x \mid k, z_s)}{q(z_s \mid x, k)}, \quad z_s \sim q(z \mid x, k)

      with K = ``num_samples`` z per class (default
      :data:`~ppl_vae.kinds.m2.LOG_LIKELIHOOD_SAMPLES` = 100).

    Writes ``evaluation.json`` and per-point ``scores.csv`` (``evaluation_scores.csv`` for a
    ``test_data`` file) into the run directory when ``write``. ``vae`` and ``user`` runs cut
    the importance-sampling chunks to ``eval_memory`` (:func:`~ppl_vae.inference.scoring.score`;
    None: the fixed chunk) and show a progress bar with ``progress``.
    """
    if num_samples is not None and (isinstance(num_samples, bool) or num_samples < 1):
        raise ConfigError(f"`num_samples` must be a positive integer, got {num_samples!r}")
    run = load_run(run_dir, device=device, test_data=test_data)
    if run.kind == "m2":
        out, scores, labels = _evaluate_m2(run, num_samples, test_data)
    else:
        out, scores, labels = _evaluate_vae(run, num_samples, test_data, eval_memory, progress)
    if write:
        write_text_atomic(run.run_dir / "evaluation.json", json.dumps(out, indent=2) + "\n")
        name = "scores.csv" if test_data is None else "evaluation_scores.csv"
        write_scores_csv(run.run_dir / name, scores, labels)
    return out


def _evaluate_vae(
    run: Run,
    num_samples: int | None,
    test_data: str | None,
    eval_memory: int | str | None = DEFAULT_EVAL_MEMORY,
    progress: bool = False,
) -> tuple[dict[str, Any], Scores, torch.Tensor | None]:
    cfg = run.config
    assert isinstance(cfg, FitConfig)
    k = num_samples if num_samples is not None else cfg.log_likelihood_samples
    lik = getattr(run.model, "likelihood", None)  # a user's pair has none of ours
    pyro.set_rng_seed(cfg.seed)
    with pyro.settings.context(module_local_params=True):
        _, _, test_x, _ = prepare_data(run.dataset, run.model, cfg.binarize, cfg.split_seed)
        scores: Scores = score(
            run.model,
            test_x,
            num_samples=k,
            chunk_size=cfg.log_likelihood_chunk,
            eval_memory=eval_memory,
            progress=progress,
        )
    s = scores.summary()
    out = {
        "test_elbo": s["elbo"],
        "test_log_likelihood": s["log_likelihood"],
        "test_log_likelihood_se": s["log_likelihood_se"],
        "log_likelihood_samples": k,
        "num_test_points": int(test_x.shape[0]),
        "epoch": run.epoch,
        "test_bits_per_dim": bits_per_dim(lik, s["log_likelihood"], run.dataset.num_levels)
        if lik is not None
        else None,
        "units": "nats per data point",
        "test_data": test_data or cfg.test_data or f"{cfg.data} (test split)",
        "eval_chunk": scores.plan.as_dict() if scores.plan is not None else None,
    }
    return out, scores, run.dataset.test_y


def _evaluate_m2(
    run: Run, num_samples: int | None, test_data: str | None
) -> tuple[dict[str, Any], Scores, torch.Tensor | None]:
    from ..kinds.m2 import LOG_LIKELIHOOD_SAMPLES, evaluation_metrics

    cfg, ds = run.config, run.dataset
    k = num_samples if num_samples is not None else LOG_LIKELIHOOD_SAMPLES
    assert run.test_x is not None
    classes = run.model.num_classes
    pyro.set_rng_seed(cfg.seed)
    with pyro.settings.context(module_local_params=True):
        report = evaluation_metrics(
            run.model,
            run.test_x,
            ds.test_y,
            list(ds.class_names or [str(i) for i in range(classes)]),
            elbo_samples=cfg.elbo_samples,
            log_likelihood_samples=k,
            num_levels=ds.num_levels,
        )
    out = {
        "kind": "m2",
        **report.metrics,
        "epoch": run.epoch,
        "weights": run.weights,
        "test_data": test_data or f"{cfg.data} (test split)",
    }
    if ds.test_y is None:
        out["note"] = "the test data have no labels: no accuracy"
    out["confusion_matrix"] = out.pop("confusion_matrix", None)
    if out["confusion_matrix"] is None:
        del out["confusion_matrix"]
    return out, report.scores, ds.test_y
