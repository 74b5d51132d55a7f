r"""Evaluation: per-point ELBO and importance-sampled log-likelihood, in nats per data point.

For K samples :math:`z_k \sim q(z \mid x)` with log-weights
:math:`\log w_k = \log p(x, z_k) - \log q(z_k \mid x)`:

.. math:: \mathrm{ELBO}(x) \approx \tfrac1K \sum_k \log w_k, \qquad
          \log p(x) \approx \operatorname{logsumexp}_k \log w_k - \log K \;\ge\; \mathrm{ELBO}.

The K samples are drawn in chunks (a vectorised particle plate of ``chunk_size``) and combined
with a running mean and a running ``logsumexp``, so memory is bounded by one chunk whatever K.
Log-densities are evaluated without any ``poutine.scale`` (the KL weight of training).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.errors import ConfigError
from .estimators import log_importance_weights


def log_weights(
    model: Callable[..., Any], guide: Callable[..., Any], x: torch.Tensor, num_samples: int
) -> torch.Tensor:
    r"""``(num_samples, N)`` log importance weights :math:`\log p(x, z_k) - \log q(z_k|x)`.

    ``model`` and ``guide`` put the batch in ``pyro.plate("data", dim=-1)``; the particles go in
    a plate at dim -2. Unscaled (``poutine.scale`` is ignored), masks honoured; see
    :func:`ppl_vae.inference.estimators.log_likelihood` for the conventions.
    """
    return log_importance_weights(model, guide, (x,), {}, num_samples, 1)


@dataclass
class Scores:
    """Per-point evaluation results (nats)."""

    elbo: torch.Tensor  # (N,)
    log_likelihood: torch.Tensor  # (N,)
    num_samples: int

    def summary(self) -> dict[str, float]:
        return {
            "elbo": float(self.elbo.mean()),
            "log_likelihood": float(self.log_likelihood.mean()),
            "log_likelihood_se": float(self.log_likelihood.std() / math.sqrt(len(self.elbo)))
            if len(self.elbo) > 1
            else float("nan"),
        }


@torch.no_grad()
def score(
    vae: Any,
    x: torch.Tensor,
    num_samples: int = 1000,
    chunk_size: int = 100,
    batch_size: int = 512,
) -> Scores:
    """Per-point ELBO and importance-sampled log-likelihood of ``x`` under a trained VAE.

    Args:
        vae: a module with ``model(x)`` / ``guide(x)`` Pyro programs (a ``kl_scale`` attribute,
            if it has one, is set to 1 while scoring).
        x: data ``(N, *data_shape)``.
        num_samples: K importance samples per point.
        chunk_size: particles drawn at once (memory is bounded by ``chunk_size * batch_size``).
        batch_size: data points scored at once.
    """
    if num_samples <= 0 or chunk_size <= 0:
        raise ConfigError(
            f"`num_samples` and `chunk_size` must be positive, got {num_samples}, {chunk_size}"
        )
    was_training = vae.training
    old_scale = getattr(vae, "kl_scale", None)
    vae.eval()
    if old_scale is not None:
        vae.kl_scale = 1.0
    elbos, lls = [], []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            run_lse = xb.new_full((xb.shape[0],), -math.inf)
            run_sum = xb.new_zeros(xb.shape[0])
            done = 0
            while done < num_samples:
                k = min(chunk_size, num_samples - done)
                lw = log_weights(vae.model, vae.guide, xb, k)
                run_lse = torch.logaddexp(run_lse, torch.logsumexp(lw, dim=0))
                run_sum = run_sum + lw.sum(0)
                done += k
            elbos.append(run_sum / num_samples)
            lls.append(run_lse - math.log(num_samples))
    finally:
        if old_scale is not None:
            vae.kl_scale = old_scale
        vae.train(was_training)
    return Scores(torch.cat(elbos), torch.cat(lls), num_samples)


def bits_per_dim(likelihood: Any, log_likelihood: float, num_levels: int | None) -> float | None:
    r"""Bits per dimension of a per-point log-likelihood, where the convention is defined.

    For a probability mass function (a likelihood with discrete support) it is
    :math:`-\log p(x) / (D \ln 2)`; for a density on data quantised to ``num_levels`` levels and
    scaled to [0, 1], the change of variables to the integer grid adds :math:`\log_2(L - 1)`
    per dimension (see :func:`ppl_vae.models.likelihoods.units.bits_per_dim`). None otherwise.
    """
    from ..models.likelihoods.units import bits_per_dim as _bpd

    dims = int(torch.Size(likelihood.data_shape).numel())
    if likelihood.support.is_discrete:
        return _bpd(-log_likelihood, dims, None)
    if num_levels is not None and num_levels > 1:
        return _bpd(-log_likelihood, dims, num_levels)
    return None


@torch.no_grad()
def mean_elbo(vae: Any, x: torch.Tensor, batch_size: int = 512) -> float:
    """The ELBO per data point of ``x`` with one sample per point (for per-epoch validation)."""
    return float(score(vae, x, num_samples=1, chunk_size=1, batch_size=batch_size).elbo.mean())


def write_scores_csv(
    path: Path,
    scores: Scores,
    labels: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Per-point scores: ``index,label,elbo,log_likelihood`` (higher = more typical)."""
    from ..config import write_text_atomic

    rows = [["index", "label", "elbo", "log_likelihood"]]
    elbo = scores.elbo.cpu().tolist()
    ll = scores.log_likelihood.cpu().tolist()
    lab = labels.cpu().tolist() if labels is not None else [""] * len(elbo)
    for i, (e, l_, y) in enumerate(zip(elbo, ll, lab, strict=True)):
        rows.append([str(i), str(y), f"{e:.6f}", f"{l_:.6f}"])
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buf.getvalue())
