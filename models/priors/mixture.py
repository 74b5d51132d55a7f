r"""Mixture-of-Gaussians prior with learned weights, means and scales.

.. math:: p(z) = \sum_{k=1}^{K} \pi_k \prod_{d=1}^{D} \mathcal{N}(z_d;\, \mu_{kd}, \sigma_{kd}^2)

A multimodal prior lets the aggregate posterior form clusters instead of being pulled into
one ball. The mixture has no closed-form KL against a Normal, so ``meanfield`` uses the Monte
Carlo term (as ``Trace_ELBO`` does); q(z|x) is a diagonal Normal (the default family for a prior
with no parameters to mirror).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..errors import ConfigError
from .base import Prior


class MixturePrior(Prior):
    r"""A mixture of K diagonal Gaussians, all parameters learned.

    Args:
        latent_dim: D.
        num_components: K >= 1.
        learn_weights: learn the mixture weights :math:`\pi` (initialised uniform) instead of
            fixing them at :math:`1/K`.
        spread: the initial means are drawn from :math:`\mathcal{N}(0, \text{spread}^2 I)`
            (from torch's random stream, so a seeded run is reproducible); the initial scales
            are 1.

    Example:
        >>> MixturePrior(2, num_components=3)().event_shape
        torch.Size([2])
    """

    def __init__(
        self,
        latent_dim: int,
        num_components: int = 10,
        learn_weights: bool = True,
        spread: float = 1.0,
    ) -> None:
        super().__init__(latent_dim)
        if isinstance(num_components, bool) or not isinstance(num_components, int):
            raise ConfigError(f"`num_components` must be an integer, got {num_components!r}")
        if num_components < 1:
            raise ConfigError(f"`num_components` must be at least 1, got {num_components}")
        if isinstance(spread, bool) or not isinstance(spread, int | float) or not spread >= 0:
            raise ConfigError(f"`spread` must be a number >= 0, got {spread!r}")
        self.num_components = num_components
        self.loc = PyroParam(spread * torch.randn(num_components, self.latent_dim))
        self.scale = PyroParam(
            torch.ones(num_components, self.latent_dim), constraint=constraints.positive
        )
        logits = torch.zeros(num_components)
        if learn_weights:
            self.logits = PyroParam(logits)
        else:
            self.register_buffer("logits", logits)

    def forward(self) -> dist.Distribution:
        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits), dist.Normal(self.loc, self.scale).to_event(1)
        )

    def summary(self, z: torch.Tensor) -> dict[str, float]:
        """The mixture weights' perplexity (how many components are in use, 1 to K)."""
        w = torch.softmax(self.logits.detach(), -1)
        entropy = -(w * w.clamp_min(1e-30).log()).sum()
        return {"components_perplexity": float(entropy.exp())}
