r"""The VAE kind: :class:`~ppl_vae.vae.VAE` trained on one mini-batch per step.

.. math:: \mathcal{L}_t(x) = -\mathbb{E}_{q(z|x)}\big[\log p(x \mid z)
    + \beta_t (\log p(z) - \log q(z \mid x))\big]

summed over the batch (the estimator's ``differentiable_loss``, through the fast path of
:func:`ppl_vae.inference.fastpath.build_loss` where it applies), with the KL weight :math:`\beta_t` of the
trainer's schedule applied as ``poutine.scale`` on the ``z`` site. Validation: the ELBO per
point of the validation split with one sample. Test: the ELBO and the importance-sampled
:math:`\log p(x)` (:func:`ppl_vae.inference.scoring.score`), bits per dimension where defined, and the
prior's own summary of the codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import FitConfig
from ..data import Dataset
from ..inference.fastpath import build_loss
from ..inference.scoring import Scores, bits_per_dim, mean_elbo, score, write_scores_csv
from ..vae import VAE
from .base import ModelKind, StepState

__all__ = ["FitResult", "VAEKind"]


@dataclass
class FitResult:
    """What :func:`ppl_vae.fit` returns."""

    vae: VAE
    config: FitConfig
    dataset: Dataset
    history: list[dict[str, float]]
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    test_scores: Scores | None = None

    @property
    def model(self) -> Any:
        """The trained module: the VAE, or a user's own model/guide pair (``--model``)."""
        return self.vae


class VAEKind(ModelKind):
    """The VAE as a model kind.

    Args:
        vae: the model/guide pair.
        elbo: the Pyro ELBO estimator.
        cfg: the run's config (batch size, evaluation settings, what metrics record).
        dataset: the loaded data set (for labels and its description).
        splits: ``(train, val, test)`` tensors after :func:`~ppl_vae.training.setup.prepare_data`.
        dynamic: re-binarise every training batch.
        device: where the data live.
    """

    name = "vae"
    monitor = "val_elbo"
    restore_best = False

    def __init__(
        self,
        vae: VAE,
        elbo: Any,
        cfg: FitConfig,
        dataset: Dataset,
        splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        dynamic: bool,
        device: torch.device,
    ) -> None:
        super().__init__(vae, cfg.seed)
        self.vae = vae
        self.cfg = cfg
        self.dataset = dataset
        self.train_x, self.val_x, self.test_x = splits
        self.dynamic = dynamic
        self.device = device
        self._loss: Callable[[torch.Tensor], torch.Tensor] = build_loss(elbo, vae)
        self._beta = 1.0
        self._perm = torch.zeros(0, dtype=torch.long)
        self.scores: Scores | None = None

    # -- batches -----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_x.shape[0] / self.cfg.batch_size)

    def start_epoch(self, epoch: int, device: torch.device) -> None:
        n = self.train_x.shape[0]
        self._perm = torch.randperm(n, generator=self.shuffle).to(device)

    def batch(self, b: int, shard: Any) -> tuple[torch.Tensor]:
        size = self.cfg.batch_size
        x = self.train_x[shard(self._perm[b * size : (b + 1) * size])]
        if self.dynamic:
            x = torch.bernoulli(x)
        return (x,)

    # -- objective ---------------------------------------------------------------------------
    def begin_step(self, s: StepState) -> None:
        self._beta = s.beta
        self.vae.kl_scale = s.beta
        super().begin_step(s)

    def end_steps(self) -> None:
        self.vae.kl_scale = 1.0

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return self._loss(x)

    def train_columns(self, sums: torch.Tensor, steps: int) -> dict[str, float]:
        return {"train_loss": float(sums[0]) / self.train_x.shape[0]}

    def schedule_columns(self) -> dict[str, float]:
        return {"kl_scale": self._beta}

    # -- reports -----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        return {"val_elbo": mean_elbo(self.vae, self.val_x)}

    def evaluate(self, history: list[dict[str, float]], train_seconds: float) -> dict[str, Any]:
        """Test ELBO and log-likelihood with the run's summary; keeps the per-point scores."""
        vae, cfg, dataset = self.vae, self.cfg, self.dataset
        self.scores = score(
            vae,
            self.test_x,
            num_samples=cfg.log_likelihood_samples,
            chunk_size=cfg.log_likelihood_chunk,
        )
        summary = self.scores.summary()
        metrics: dict[str, Any] = {
            "test_elbo": summary["elbo"],
            "test_log_likelihood": summary["log_likelihood"],
            "test_log_likelihood_se": summary["log_likelihood_se"],
            "log_likelihood_samples": cfg.log_likelihood_samples,
            "units": "nats per data point",
            "epochs": cfg.epochs,
            "train_seconds": train_seconds,
            "final_val_elbo": history[-1]["val_elbo"] if history else float("nan"),
            "best_val_elbo": max(h["val_elbo"] for h in history) if history else float("nan"),
            "best_epoch": int(max(history, key=lambda h: h["val_elbo"])["epoch"]) if history else 0,
            "prior": cfg.prior,
            "likelihood": cfg.likelihood,
            "estimator": cfg.estimator,
            "latent_dim": cfg.latent_dim,
            "binarization": "dynamic"
            if self.dynamic
            else ("static" if cfg.binarize == "static" else "none"),
            "num_parameters": sum(p.numel() for p in vae.parameters()),
            "device": str(self.device),
            "data": dataset.describe(),
        }
        bpd = bits_per_dim(vae.likelihood, summary["log_likelihood"], dataset.num_levels)
        if bpd is not None:
            metrics["test_bits_per_dim"] = bpd
        prior_summary = vae.prior.summary(vae.codes(self.test_x))
        if prior_summary:
            metrics["prior_summary"] = prior_summary
        return metrics

    def write_outputs(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        assert self.scores is not None
        write_scores_csv(run_dir / "scores.csv", self.scores, self.dataset.test_y)

    def figures(
        self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, float]]
    ) -> Sequence[Path]:
        from .. import figures

        result = FitResult(self.vae, self.cfg, self.dataset, history, metrics, run_dir, self.scores)
        return figures.write_figures(result, self.test_x, draws=self.cfg.figure_draws)
