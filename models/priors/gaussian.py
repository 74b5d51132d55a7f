r"""Gaussian prior: standard normal, or a diagonal normal with learned location and scale."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..distributions.family import MirrorFamily, VariationalFamily
from ..distributions.normal import Normal, StandardNormal
from .base import Prior

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class GaussianPrior(Prior):
    r"""Diagonal Gaussian prior :math:`p(z) = \prod_d \mathcal{N}(z_d;\, \mu_d, \sigma_d^2)`.

    Args:
        latent_dim: D.
        learn_loc: learn :math:`\mu` (initialised at 0) instead of fixing it at 0.
        learn_scale: learn :math:`\sigma` (initialised at 1) instead of fixing it at 1.

    Example:
        >>> GaussianPrior(2)().event_shape
        torch.Size([2])
    """

    def __init__(self, latent_dim: int, learn_loc: bool = False, learn_scale: bool = False) -> None:
        super().__init__(latent_dim)
        loc = torch.zeros(self.latent_dim)
        scale = torch.ones(self.latent_dim)
        if learn_loc:
            self.loc = PyroParam(loc)
        else:
            self.register_buffer("loc", loc)
        if learn_scale:
            self.scale = PyroParam(scale, constraint=constraints.positive)
        else:
            self.register_buffer("scale", scale)

    def forward(self) -> dist.Distribution:
        if self._is_standard():
            return StandardNormal(self.loc, self.scale).to_event(1)
        return dist.Normal(self.loc, self.scale).to_event(1)

    def log_density(self, z: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        r""":math:`-\tfrac12 \lVert z \rVert^2 - \tfrac D2 \log 2\pi` at the fixed 0 and 1 (two
        kernels on ``(..., D)``, where building ``StandardNormal(...).to_event(1)`` and scoring
        it takes a distribution, a wrapper and four kernels); the distribution's ``log_prob``
        otherwise, and whenever distributions validate their arguments (its support check).
        """
        if (
            not labels
            and not torch.distributions.Distribution._validate_args
            and z.shape[-1:] == (self.latent_dim,)
            and self._is_standard()
        ):
            return z.square().sum(-1) * -0.5 - self.latent_dim * _HALF_LOG_2PI
        return super().log_density(z, *labels)

    def _is_standard(self) -> bool:
        """Fixed location 0 and scale 1 (:class:`StandardNormal`'s leaner ``log_prob``).

        Checked again only when a buffer changed (its version counter, as an in-place write or
        ``load_state_dict`` bumps it, or its storage, as ``.to(device)`` replaces it), so the
        host synchronisation of the check happens once, not per step.
        """
        loc, scale = self._buffers.get("loc"), self._buffers.get("scale")
        if loc is None or scale is None:  # learned
            return False
        if loc.is_inference() or scale.is_inference():  # no version counter: check each time
            return bool((loc == 0).all()) and bool((scale == 1).all())
        key = (loc._version, scale._version, loc.data_ptr(), scale.data_ptr())
        cached = self.__dict__.get("_standard_check")
        if cached is None or cached[0] != key:
            cached = (key, bool((loc == 0).all()) and bool((scale == 1).all()))
            self.__dict__["_standard_check"] = cached
        return cached[1]

    def guide_family(self) -> VariationalFamily:
        """A diagonal Normal q(z|x), scoring its own draws from their noise (:class:`Normal`)."""
        return MirrorFamily(Normal)
