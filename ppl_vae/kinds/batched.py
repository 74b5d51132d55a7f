r"""What the one-batch kinds share (the VAE and a user's pair): shuffled mini-batches of the
training split, the KL weight of the step, the validation ELBO, and the ELBO / IS
:math:`\log p(x)` test metrics with their per-point scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset
from ..inference.scoring import Scores, mean_elbo, score, write_scores_csv
from .base import ModelKind, StepState

__all__ = ["BatchedKind"]


class BatchedKind(ModelKind):
    """A kind trained on one shuffled mini-batch of ``x`` per step, validated by the ELBO.

    Args:
        module: the model/guide pair.
        cfg: the run's :class:`~ppl_vae.config.FitConfig`.
        dataset: the loaded data set.
        splits: ``(train, val, test)`` tensors after
            :func:`~ppl_vae.training.setup.prepare_data`.
        dynamic: re-binarise every training batch.
        device: where the data live.
    """

    monitor = "val_elbo"

    def __init__(
        self,
        module: Any,
        cfg: Any,
        dataset: Dataset,
        splits: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        dynamic: bool,
        device: torch.device,
    ) -> None:
        super().__init__(module, cfg.seed)
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.train_x, self.val_x, self.test_x = splits
        self.dynamic = dynamic
        self._beta = 1.0
        self._perm = torch.zeros(0, dtype=torch.long)
        self.scores: Scores | None = None

    # -- batches -----------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_x.shape[0] / self.cfg.batch_size)

    def start_epoch(self, epoch: int, device: torch.device) -> None:
        self._perm = torch.randperm(self.train_x.shape[0], generator=self.shuffle).to(device)

    def batch(self, b: int, shard: Any) -> tuple[torch.Tensor]:
        size = self.cfg.batch_size
        x = self.train_x[shard(self._perm[b * size : (b + 1) * size])]
        if self.dynamic:
            x = torch.bernoulli(x)
        return (x,)

    # -- objective ---------------------------------------------------------------------------
    def begin_step(self, s: StepState) -> None:
        self._beta = s.beta
        super().begin_step(s)

    def train_columns(self, sums: torch.Tensor, steps: int) -> dict[str, float]:
        return {"train_loss": float(sums[0]) / self.train_x.shape[0]}

    def schedule_columns(self) -> dict[str, float]:
        return {"kl_scale": self._beta}

    # -- reports -----------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        return {"val_elbo": mean_elbo(self.module, self.val_x)}

    def score_test(self, history: list[dict[str, float]], train_seconds: float) -> dict[str, Any]:
        """Scores the test split (kept for ``scores.csv``) and the metrics every such kind
        reports: ELBO, IS log p(x) and its standard error, the run's summary."""
        cfg = self.cfg
        self.scores = score(
            self.module,
            self.test_x,
            num_samples=cfg.log_likelihood_samples,
            chunk_size=cfg.log_likelihood_chunk,
            eval_memory=cfg.eval_memory,
            progress=self.progress,
        )
        summary = self.scores.summary()
        return {
            "test_elbo": summary["elbo"],
            "test_log_likelihood": summary["log_likelihood"],
            "test_log_likelihood_se": summary["log_likelihood_se"],
            "log_likelihood_samples": cfg.log_likelihood_samples,
            "units": "nats per data point",
            "epochs": cfg.epochs,
            "train_seconds": train_seconds,
            "final_val_elbo": history[-1]["val_elbo"] if history else float("nan"),
            "best_val_elbo": max(h["val_elbo"] for h in history) if history else float("nan"),
            # the trainer's rule: the last epoch of the best value (the weights evaluated)
            "best_epoch": int(max(reversed(history), key=lambda h: h["val_elbo"])["epoch"])
            if history
            else 0,
        }

    def write_outputs(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        assert self.scores is not None
        write_scores_csv(run_dir / "scores.csv", self.scores, self.dataset.test_y)
