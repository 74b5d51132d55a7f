r"""Bernoulli likelihood for binary data, parameterised by logits."""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.util import is_validation_enabled
from torch.distributions import constraints

from .base import Likelihood


def _broadcasts_to(x: torch.Tensor, target: torch.Tensor) -> bool:
    """``x`` has ``target``'s trailing shape (``target`` may add leading dims, e.g. particles)."""
    return x.dim() <= target.dim() and target.shape[target.dim() - x.dim() :] == x.shape


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

    def log_prob_sum(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum x\eta - \log(1 + e^\eta)` as one fused kernel, ``-BCE(\eta, x)`` summed.

        The same elementwise function as ``Bernoulli(logits).log_prob`` (which is
        ``-binary_cross_entropy_with_logits``) summed in one reduction. With validation on, or
        data of another dtype or shape than the logits', it is the distribution's sum.
        """
        (logits,) = self.split(out)
        if is_validation_enabled() or x.dtype != logits.dtype or not _broadcasts_to(x, logits):
            return super().log_prob_sum(out, x)
        return -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="sum")

    def suggestion(self, x: torch.Tensor) -> str:
        if bool(((x >= 0) & (x <= 1)).all()):
            return (
                "values in [0, 1] that are not binary: use --likelihood continuous-bernoulli, "
                "or binarise with --binarize static|dynamic"
            )
        return "data outside [0, 1]: use --likelihood normal (or rescale the data)"
