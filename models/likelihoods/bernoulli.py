r"""Bernoulli likelihood for binary data, parameterised by logits."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .base import Likelihood


class BernoulliLikelihood(Likelihood):
    r"""Independent Bernoulli pixels, :math:`p(x \mid \eta) = \prod_i \sigma(\eta_i)^{x_i}(1-\sigma(\eta_i))^{1-x_i}`.

    Args:
        data_shape: shape of one data point.
    """

    params_per_element = 1
    support = constraints.boolean
    support_text = "binary values {0, 1}"

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        (logits,) = self.split(out)
        return dist.Bernoulli(logits=logits).to_event(self.event_dim)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        (logits,) = self.split(out)
        return torch.sigmoid(logits)

    def suggestion(self, x: torch.Tensor) -> str:
        if bool(((x >= 0) & (x <= 1)).all()):
            return (
                "values in [0, 1] that are not binary: use --likelihood continuous-bernoulli, "
                "or binarise with --binarize static|dynamic"
            )
        return "data outside [0, 1]: use --likelihood normal (or rescale the data)"
