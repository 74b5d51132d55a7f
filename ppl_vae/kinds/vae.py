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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import FitConfig
from ..data import Dataset
from ..inference.fastpath import build_loss
from ..inference.free_bits import free_bits_loss
from ..inference.scoring import Scores, bits_per_dim
from ..vae import VAE
from .base import StepState
from .batched import BatchedKind

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


class VAEKind(BatchedKind):
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
    restore_best = True

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
        super().__init__(vae, cfg, dataset, splits, dynamic, device)
        self.vae = vae
        self._loss: Callable[[torch.Tensor], torch.Tensor] = build_loss(elbo, vae)
        self._free_bits = free_bits_loss(cfg, vae.model, vae.guide, elbo)

    # -- objective ---------------------------------------------------------------------------
    @property
    def step_paths(self) -> dict[str, int] | None:
        if self._free_bits is not None:  # free bits: its own loss, no fused fast path
            return None
        steps = getattr(self._loss, "steps", None)  # a FastELBOLoss (trace, meanfield)
        return dict(steps) if isinstance(steps, dict) else None

    def begin_step(self, s: StepState) -> None:
        self.vae.kl_scale = s.beta
        super().begin_step(s)

    def end_steps(self) -> None:
        self.vae.kl_scale = 1.0

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        if self._free_bits is not None:
            return self._free_bits(x, self.vae.kl_scale)
        return self._loss(x)

    # -- reports -----------------------------------------------------------------------------
    def evaluate(self, history: list[dict[str, float]], train_seconds: float) -> dict[str, Any]:
        """Test ELBO and log-likelihood with the run's summary; keeps the per-point scores."""
        vae, cfg, dataset = self.vae, self.cfg, self.dataset
        metrics = self.score_test(history, train_seconds)
        metrics.update(
            {
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
        )
        bpd = bits_per_dim(vae.likelihood, metrics["test_log_likelihood"], dataset.num_levels)
        if bpd is not None:
            metrics["test_bits_per_dim"] = bpd
        prior_summary = vae.prior.summary(vae.codes(self.test_x))
        if prior_summary:
            metrics["prior_summary"] = prior_summary
        return metrics

    def figures(
        self, run_dir: Path, metrics: dict[str, Any], history: list[dict[str, float]]
    ) -> Sequence[Path]:
        from .. import figures

        result = FitResult(self.vae, self.cfg, self.dataset, history, metrics, run_dir, self.scores)
        return figures.write_figures(
            result, self.test_x, draws=self.cfg.figure_draws, progress=self.progress
        )
