r"""Continuous Bernoulli likelihood for [0, 1]-valued data that are not binary."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..distributions.continuous_bernoulli import StableContinuousBernoulli, cb_mean
from .base import Likelihood


class ContinuousBernoulliLikelihood(Likelihood):
    r"""Independent continuous Bernoulli elements (Loaiza-Ganem & Cunningham 2019), logits :math:`\eta`.

    .. math:: p(x \mid \eta) = \prod_i \frac{\eta_i}{\tanh(\eta_i/2)}\,
        \sigma(\eta_i)^{x_i} (1 - \sigma(\eta_i))^{1 - x_i}, \qquad x_i \in [0, 1]

    Unlike the Bernoulli "likelihood" often applied to grey-level pixels, this density is
    normalised on :math:`[0, 1]`, so its log-likelihoods are comparable with other densities.
    Its mean is not :math:`\sigma(\eta)` but
    :math:`\tfrac12 + \tfrac{1}{2\tanh(\eta/2)} - \tfrac{1}{\eta}`. The normaliser is evaluated
    stably for every logit (see :mod:`ppl_vae.models.distributions.continuous_bernoulli`).

    Args:
        data_shape: shape of one data point.

    References:
        Loaiza-Ganem, G. and Cunningham, J. P. (2019). The continuous Bernoulli: fixing a
        pervasive error in variational autoencoders. NeurIPS.
    """

    params_per_element = 1
    support = constraints.unit_interval
    support_text = "values in [0, 1]"

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        (logits,) = self.split(out)
        return StableContinuousBernoulli(logits).to_event(self.event_dim)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        (logits,) = self.split(out)
        return cb_mean(logits)

    def suggestion(self, x: torch.Tensor) -> str:
        if not bool(torch.isfinite(x).all()):
            return "the data contain NaN or infinite values: remove or impute them"
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0 and hi <= 255 and bool((x == x.round()).all()):
            return (
                f"the data look like integer levels 0..{hi:.0f}: divide by the largest level "
                "(e.g. 255 for 8-bit images) to bring them into [0, 1], or use "
                "--likelihood discretized-logistic on the rescaled data"
            )
        return "data outside [0, 1]: use --likelihood normal (or laplace), or rescale to [0, 1]"
