r"""Flow prior: a standard normal pushed through learned invertible transforms.

.. math:: z = f_K \circ \dots \circ f_1(u), \quad u \sim \mathcal{N}(0, I), \qquad
    \log p(z) = \log \mathcal{N}(f^{-1}(z)) + \log\left|\det \partial f^{-1}/\partial z\right|

The transforms are :mod:`pyro.distributions.transforms`'. ``affine-autoregressive`` is used in
its *inverse* direction, a masked autoregressive flow (Papamakarios et al. 2017): the density of a
code, which the ELBO evaluates at every step, takes one network pass per transform, and only
drawing from the prior (figures, ``ppl-vae sample``) takes D passes. ``spline-coupling``
(Durkan et al. 2019) is one pass either way. Between transforms the coordinates are reversed, so
every coordinate is transformed given every other. q(z|x) is a diagonal Normal.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from ..errors import ConfigError
from .base import Prior

FLOWS = ("affine-autoregressive", "spline-coupling")


class FlowPrior(Prior):
    r"""A normalizing-flow prior :math:`p(z)`.

    Args:
        latent_dim: D >= 2.
        flow: ``"affine-autoregressive"`` (MAF direction) or ``"spline-coupling"``.
        num_flows: K, the number of transforms.
        hidden_dims: hidden widths of each transform's network (default ``[4 D]``, at least 32).

    Example:
        >>> FlowPrior(3, num_flows=2)().event_shape
        torch.Size([3])
    """

    def __init__(
        self,
        latent_dim: int,
        flow: str = "affine-autoregressive",
        num_flows: int = 2,
        hidden_dims: list[int] | None = None,
    ) -> None:
        super().__init__(latent_dim)
        d = self.latent_dim
        if d < 2:
            raise ConfigError(f"a flow prior needs latent_dim >= 2, got {d}")
        if flow not in FLOWS:
            raise ConfigError(f"unknown flow {flow!r}; expected one of {list(FLOWS)}")
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ConfigError(f"`num_flows` must be a positive integer, got {num_flows!r}")
        hidden = [max(32, 4 * d)] if hidden_dims is None else [int(h) for h in hidden_dims]
        if not hidden or any(h <= 0 for h in hidden):
            raise ConfigError(f"`hidden_dims` must be positive widths, got {hidden_dims!r}")
        self.flow, self.num_flows = flow, num_flows
        self.register_buffer("base_loc", torch.zeros(d))
        self.register_buffer("base_scale", torch.ones(d))
        self.register_buffer("reverse", torch.arange(d - 1, -1, -1))
        if flow == "affine-autoregressive":
            layers = [T.affine_autoregressive(d, hidden_dims=hidden) for _ in range(num_flows)]
        else:
            layers = [T.spline_coupling(d, hidden_dims=hidden) for _ in range(num_flows)]
        self.layers = nn.ModuleList(layers)

    def transforms(self) -> list[torch.distributions.Transform]:
        """The maps from the base noise u to z, in order (the permutation between layers)."""
        out: list[torch.distributions.Transform] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                out.append(T.Permute(self.reverse))
            out.append(layer.inv if self.flow == "affine-autoregressive" else layer)
        return out

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())
