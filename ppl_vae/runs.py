r"""Reopening a run directory: its config, data split and trained model, for evaluation and sampling."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from . import checkpoint as ckpt
from .config import FitConfig, write_text_atomic
from .data import Dataset
from .models.errors import ConfigError
from .scoring import Scores, bits_per_dim, score, write_scores_csv
from .train import build_config_vae, load_config_data, prepare_data, resolve_device
from .vae import VAE


@dataclass
class Run:
    """A trained run loaded from its directory."""

    run_dir: Path
    config: FitConfig
    vae: VAE
    dataset: Dataset
    epoch: int
    device: torch.device


def load_run(run_dir: str | Path, device: str = "auto", test_data: str | None = None) -> Run:
    """Rebuild the model of a run from ``config.toml`` and load its newest checkpoint.

    The data split is rebuilt from the config (same seed, same split). ``test_data`` replaces
    the test split with another file (e.g. for anomaly scoring).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a ppl-vae run directory (no config.toml)")
    cfg = FitConfig.load(run_dir / "config.toml")
    dev = resolve_device(device)
    with pyro.settings.context(module_local_params=True):
        ds = load_config_data(cfg, test_data=test_data, download=False)
        vae = build_config_vae(cfg, ds)
        state = ckpt.load_checkpoint(run_dir, map_location=dev)
        try:
            vae.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as e:
            raise ConfigError(
                f"checkpoint in {str(run_dir)!r} does not match the model its config builds: "
                f"{ckpt.describe_load_error(e)}"
            ) from None
    vae.to(dev).eval()
    return Run(run_dir, cfg, vae, ds.to(dev), int(state["epoch"]), dev)


def evaluate(
    run_dir: str | Path,
    num_samples: int | None = None,
    device: str = "auto",
    test_data: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    r"""Test ELBO and importance-sampled log-likelihood of a run, in nats per data point.

    Writes ``evaluation.json`` and per-point ``scores.csv`` (``evaluation_scores.csv`` for a
    ``test_data`` file) into the run directory when ``write``.
    """
    run = load_run(run_dir, device=device, test_data=test_data)
    cfg = run.config
    k = num_samples if num_samples is not None else cfg.log_likelihood_samples
    pyro.set_rng_seed(cfg.seed)
    with pyro.settings.context(module_local_params=True):
        _, _, test_x, _ = prepare_data(run.dataset, run.vae, cfg.binarize, cfg.seed)
        scores: Scores = score(run.vae, test_x, num_samples=k, chunk_size=cfg.log_likelihood_chunk)
    s = scores.summary()
    out = {
        "test_elbo": s["elbo"],
        "test_log_likelihood": s["log_likelihood"],
        "test_log_likelihood_se": s["log_likelihood_se"],
        "log_likelihood_samples": k,
        "num_test_points": int(test_x.shape[0]),
        "epoch": run.epoch,
        "test_bits_per_dim": bits_per_dim(
            run.vae.likelihood, s["log_likelihood"], run.dataset.num_levels
        ),
        "units": "nats per data point",
        "test_data": test_data or cfg.test_data or f"{cfg.data} (test split)",
    }
    if write:
        write_text_atomic(run.run_dir / "evaluation.json", json.dumps(out, indent=2) + "\n")
        name = "scores.csv" if test_data is None else "evaluation_scores.csv"
        labels = run.dataset.test_y
        write_scores_csv(run.run_dir / name, scores, labels)
    return out
