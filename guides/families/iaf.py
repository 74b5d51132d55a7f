r"""Inverse autoregressive flow posterior (Kingma et al. 2016).

.. math:: z_0 = \mu(x) + \sigma(x) \odot \varepsilon, \qquad
    z_k = \mu_k(z_{k-1}, h) + \sigma_k(z_{k-1}, h) \odot z_{k-1}, \quad k = 1, \dots, K,

    \log q(z_K \mid x) = \log \mathcal{N}(\varepsilon; 0, I) - \sum_d \log \sigma_d(x)
        - \sum_{k=1}^{K} \sum_d \log \sigma_{k,d}(z_{k-1}, h),

where each :math:`(\mu_k, \sigma_k)` is an autoregressive network (MADE) of :math:`z_{k-1}`,
conditioned on a context :math:`h` the encoder emits beside :math:`\mu` and :math:`\sigma` (one
extra block of ``latent_dim`` outputs), and the coordinates are reversed between steps. Sampling
and the density of a sample are one pass per step (the density reuses the forward pass through
each transform's cache); the density of any other point (an estimator that re-scores detached
draws: ``stl``, ``dreg``) inverts the flow, ``latent_dim`` passes per step. The transforms are
:mod:`pyro.distributions.transforms`' ``ConditionalAffineAutoregressive``.

The flow lives on the real line, so it fits priors whose support is the real line (Gaussian,
mixture, flow, VampPrior, Student-t, ...); the engine refuses it for any other prior.
"""

from __future__ import annotations

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import constraints

from ...models.distributions.family import VariationalFamily
from ...models.distributions.normal import Normal
from ...models.errors import ConfigError


class IAFFamily(VariationalFamily):
    r"""A diagonal Normal followed by K inverse autoregressive transforms.

    Args:
        latent_dim: D >= 2 (given by the engine).
        num_flows: K >= 1.
        hidden_dims: hidden widths of each step's autoregressive network (default
            ``[max(32, 4 D)]``).
        context: condition every step on the encoder's context block h (Kingma et al.); with
            ``False`` the steps depend on z alone.
    """

    def __init__(
        self,
        latent_dim: int,
        num_flows: int = 2,
        hidden_dims: list[int] | None = None,
        context: bool = True,
    ) -> None:
        super().__init__()
        d = int(latent_dim)
        if d < 2:
            raise ConfigError(f"the iaf guide family needs latent_dim >= 2, got {d}")
        if isinstance(num_flows, bool) or not isinstance(num_flows, int) or num_flows < 1:
            raise ConfigError(f"`num_flows` must be a positive integer, got {num_flows!r}")
        hidden = [max(32, 4 * d)] if hidden_dims is None else [int(h) for h in hidden_dims]
        if not hidden or any(h <= 0 for h in hidden):
            raise ConfigError(f"`hidden_dims` must be positive widths, got {hidden_dims!r}")
        self.latent_dim, self.num_flows, self.context = d, num_flows, bool(context)
        self.param_constraints["loc"] = constraints.real
        self.param_constraints["scale"] = constraints.positive
        if self.context:
            self.param_constraints["context"] = constraints.real
            layers = [
                T.conditional_affine_autoregressive(d, d, hidden_dims=hidden)
                for _ in range(num_flows)
            ]
        else:
            layers = [T.affine_autoregressive(d, hidden_dims=hidden) for _ in range(num_flows)]
        self.layers = nn.ModuleList(layers)
        self.register_buffer("reverse", torch.arange(d - 1, -1, -1))

    def transforms(self, context: torch.Tensor | None) -> list[torch.distributions.Transform]:
        """The steps z_0 -> z_K, conditioned on ``context`` ``(N, D)`` (None without context)."""
        out: list[torch.distributions.Transform] = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                out.append(T.Permute(self.reverse))
            out.append(layer.condition(context) if self.context else layer)
        return out

    def build(self, **params: torch.Tensor) -> dist.Distribution:
        base = Normal(params["loc"], params["scale"]).to_event(1)
        return dist.TransformedDistribution(base, self.transforms(params.get("context")))

    def extra_repr(self) -> str:
        return f"IAF(num_flows={self.num_flows}, context={self.context})"
