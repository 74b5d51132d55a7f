r"""A label-conditioned Gaussian prior for the semi-supervised model: :math:`p(z \mid y)`.

.. math:: p(z \mid y = k) = \prod_{d=1}^{D} \mathcal{N}(z_d;\, \mu_{kd}, \sigma_{kd}^2)

M2 with :math:`p(z)` independent of :math:`y` asks :math:`z` to carry everything *but* the class
(the style); conditioning the prior on the label lets each class have a region of its own in
latent space instead, and a labelled point is scored against its class's prior. The learned
locations start at small random values (torch's stream, so a seeded run is reproducible), the
scales at 1. For a relaxed label guide (a point on the simplex instead of a one-hot vector),
:math:`\mu(y) = y^\top \mu` and :math:`\sigma(y) = y^\top \sigma` interpolate between classes.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..distributions.family import MirrorFamily, VariationalFamily
from ..distributions.normal import Normal
from ..errors import ConfigError
from .base import Prior


class ClassConditionalPrior(Prior):
    r"""A diagonal Gaussian per class, locations (and optionally scales) learned.

    Args:
        latent_dim: D.
        num_classes: K (given by the semi-supervised model).
        learn_scale: learn a scale per class and dimension instead of fixing it at 1.
        spread: standard deviation of the initial locations.

    Example:
        >>> p = ClassConditionalPrior(2, num_classes=3)
        >>> p(torch.eye(3)).batch_shape, p(torch.eye(3)).event_shape
        (torch.Size([3]), torch.Size([2]))
    """

    label_conditional = True

    def __init__(
        self, latent_dim: int, num_classes: int, learn_scale: bool = False, spread: float = 0.1
    ) -> None:
        super().__init__(latent_dim)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        if isinstance(spread, bool) or not isinstance(spread, int | float) or not spread >= 0:
            raise ConfigError(f"`spread` must be a number >= 0, got {spread!r}")
        self.num_classes = num_classes
        self.loc = PyroParam(spread * torch.randn(num_classes, self.latent_dim))
        scale = torch.ones(num_classes, self.latent_dim)
        if learn_scale:
            self.scale = PyroParam(scale, constraint=constraints.positive)
        else:
            self.register_buffer("scale", scale)

    def forward(self, y: torch.Tensor) -> dist.Distribution:  # type: ignore[override]
        """p(z | y) for one-hot (or relaxed) labels ``(..., K)``: batch shape ``(...)``."""
        y = y.to(self.loc.dtype)
        return dist.Normal(y @ self.loc, y @ self.scale).to_event(1)

    def guide_family(self) -> VariationalFamily:
        return MirrorFamily(Normal)
