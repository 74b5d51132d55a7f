r"""Relaxed labels: Gumbel-softmax samples of y, annealed temperature, under ``Trace_ELBO``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from ...models.distributions.family import check_temperatures
from ...models.errors import ConfigError
from .base import LabelGuide


class GumbelSoftmaxCategorical(TorchDistribution):
    r"""Relaxed one-hot samples (Gumbel-softmax) scored with the categorical log-mass, made linear.

    Sampling is the Gumbel-softmax / concrete relaxation (Jang et al. 2017; Maddison et al. 2017):

    .. math:: y = \operatorname{softmax}\big((\ell + g) / \tau\big), \quad
        g_k \sim \mathrm{Gumbel}(0, 1), \qquad
        \log \tilde p(y) = \sum_{k=1}^{K} y_k \log \pi_k, \quad \pi = \operatorname{softmax}(\ell)

    **The density (design choice).** :meth:`log_prob` is *not* the concrete density: it is the
    categorical log-mass :math:`\log \pi_k` extended linearly from the vertices of the simplex to
    its interior. At a one-hot ``y`` it is exactly the categorical log-mass, so labelled points
    (observed one-hot) get :math:`\log \pi_y` and, as :math:`\tau \to 0`, the relaxed
    ``Trace_ELBO`` objective converges to the discrete ELBO that exact enumeration computes (the
    KL term of ``y`` converges to the categorical :math:`\mathrm{KL}(q(y|x) \,\|\, p(y))`:
    :math:`\mathbb{E}[\log\tilde q(y) - \log\tilde p(y)]
    = \sum_k \mathbb{E}[y_k] \log(q_k / \pi_k)` with :math:`\mathbb{E}[y_k] \to q_k`). The
    concrete density would not: with the same temperature for prior and guide, its log-ratio
    :math:`\log p_\tau(y) - \log q_\tau(y)` does not depend on :math:`\tau` at all, and its
    expectation is not the categorical KL. The prior and the guide of the SSVAE both use this
    class, so :math:`\log\tilde p(y) - \log\tilde q(y \mid x)` is a difference of the same
    functional form. It is not normalised on the simplex (and need not be: the objective is a
    surrogate for the discrete bound, not a bound on a relaxed model).

    Args:
        temperature: :math:`\tau > 0` (a scalar tensor).
        logits: unnormalised log-probabilities :math:`\ell`, ``(*batch, K)``.
    """

    arg_constraints = {"logits": constraints.real_vector}  # noqa: RUF012 - torch's convention
    support = constraints.simplex
    has_rsample = True

    def __init__(
        self,
        temperature: torch.Tensor,
        logits: torch.Tensor,
        validate_args: bool | None = None,
    ) -> None:
        self.temperature = temperature
        self.logits = logits.log_softmax(-1)
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    def expand(
        self, batch_shape: torch.Size | Sequence[int], _instance: object = None
    ) -> GumbelSoftmaxCategorical:
        new = self._get_checked_instance(GumbelSoftmaxCategorical, _instance)
        batch_shape = torch.Size(batch_shape)
        new.temperature = self.temperature
        new.logits = self.logits.expand(batch_shape + self.event_shape)
        super(GumbelSoftmaxCategorical, new).__init__(
            batch_shape, self.event_shape, validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        finfo = torch.finfo(self.logits.dtype)
        u = self.logits.new_empty(shape).uniform_(finfo.tiny, 1.0 - finfo.eps)
        gumbels = -(-u.log()).log()
        return ((self.logits + gumbels) / self.temperature).softmax(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return (value * self.logits).sum(-1)


class RelaxedLabelGuide(LabelGuide):
    r"""q(y | x) sampled as a Gumbel-softmax relaxation, so ``Trace_ELBO`` uses pathwise gradients.

    .. math:: y = \operatorname{softmax}\big((\log q_\phi(\cdot \mid x) + g)/\tau\big),
        \qquad \tau(p) = \tau_0\,(\tau_1/\tau_0)^{p}

    The decoder and the encoder read the relaxed one-hot vector; the ``y`` terms of the bound
    use :class:`GumbelSoftmaxCategorical`'s linearised categorical log-mass in both the guide and
    the model (:meth:`prior`), so as :math:`\tau \to 0` the objective converges to the discrete
    ELBO. The temperature is a buffer (saved in checkpoints) lowered geometrically by
    :meth:`anneal` from :math:`\tau_0` to :math:`\tau_1` over training. For :math:`\tau > 0` the
    objective is biased (neither a bound nor its unbiased estimate); lower :math:`\tau` means
    less bias and larger gradient variance (it grows like :math:`1/\tau`). In eval mode the guide
    samples exact one-hot labels from :math:`q_\phi(y \mid x)`.

    Args:
        data_shape, num_classes, hidden_dims, network, dropout, channels: see
            :class:`~ppl_vae.guides.labels.base.LabelGuide`.
        initial_temperature: :math:`\tau_0 > 0`.
        final_temperature: :math:`\tau_1`, :math:`0 < \tau_1 \le \tau_0`.

    References:
        Jang, E., Gu, S. and Poole, B. (2017). Categorical reparameterization with
        Gumbel-softmax. ICLR.
        Maddison, C. J., Mnih, A. and Teh, Y. W. (2017). The concrete distribution: a continuous
        relaxation of discrete random variables. ICLR.
    """

    estimator: ClassVar[str] = "trace"

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int,
        hidden_dims: Sequence[int] = (256,),
        network: str = "auto",
        dropout: float = 0.0,
        channels: Sequence[int] = (32, 64),
        initial_temperature: float = 1.0,
        final_temperature: float = 0.5,
    ) -> None:
        super().__init__(data_shape, num_classes, hidden_dims, network, dropout, channels)
        check_temperatures(initial_temperature, final_temperature)
        self.initial_temperature = float(initial_temperature)
        self.final_temperature = float(final_temperature)
        self.register_buffer("temperature", torch.tensor(self.initial_temperature))

    def anneal(self, progress: float) -> None:
        r"""Set :math:`\tau = \tau_0 (\tau_1/\tau_0)^{p}` (``progress`` :math:`p` in [0, 1])."""
        if not math.isfinite(progress):
            raise ConfigError(f"`progress` must be a finite number in [0, 1], got {progress!r}")
        p = min(max(float(progress), 0.0), 1.0)
        t = self.initial_temperature * (self.final_temperature / self.initial_temperature) ** p
        self.temperature.fill_(t)

    def prior(self, logits: torch.Tensor) -> dist.Distribution:
        return GumbelSoftmaxCategorical(self.temperature, logits)

    def guide_dist(self, x: torch.Tensor) -> dist.Distribution:
        if self.training:
            return GumbelSoftmaxCategorical(self.temperature, self(x))
        return dist.OneHotCategorical(logits=self(x))
