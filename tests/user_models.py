"""User model/guide pairs written as a user would, for the tests of ``--model``.

Each is an ordinary :class:`~pyro.nn.PyroModule` with ``model(x)`` / ``guide(x)``; nothing in it
is a ppl_vae class.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn

from ppl_vae.components import resolve

#: The example's two-layer pair, loaded as ``--model examples/own_model.py:TwoLayerVAE`` does.
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_model.py"
TwoLayerVAE = resolve(f"{EXAMPLE}:TwoLayerVAE", "model")


class ForgetfulGuide(TwoLayerVAE):
    """A guide that does not sample ``z2``: the contract check must refuse it."""

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z1", self._normal(self.enc_z1(x.reshape(x.shape[0], -1))))


class LinearGaussianChain(PyroModule):
    r"""A linear-Gaussian two-layer model whose :math:`\log p(x)` has a closed form.

    .. math:: z_2 \sim \mathcal{N}(0, I_2),\; z_1 \mid z_2 \sim \mathcal{N}(A z_2, s_1^2 I_2),\;
        x \mid z_1 \sim \mathcal{N}(B z_1, s_2^2 I_3)
        \;\Rightarrow\; x \sim \mathcal{N}\big(0,\; B (A A^\top + s_1^2 I) B^\top + s_2^2 I\big)

    The guide is the model's own prior chain with a learnable shift, so importance sampling
    over both sites is consistent whatever its parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.register_buffer("A", torch.randn(2, 2, generator=g))
        self.register_buffer("B", torch.randn(3, 2, generator=g))
        self.s1, self.s2 = 0.8, 0.7
        self.shift = nn.Parameter(torch.zeros(2))

    def marginal(self) -> dist.Distribution:
        cov = self.B @ (self.A @ self.A.T + self.s1**2 * torch.eye(2)) @ self.B.T
        return dist.MultivariateNormal(torch.zeros(3), cov + self.s2**2 * torch.eye(3))

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(z2 @ self.A.T, self.s1).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ self.B.T, self.s2).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(2) + self.shift, 1.0).to_event(1))
            pyro.sample("z1", dist.Normal(z2 @ self.A.T, self.s1).to_event(1))


class AsksForComponents(PyroModule):
    """A pair that asks the engine for its prior, likelihood and widths by parameter name."""

    def __init__(self, data_shape, prior, likelihood, hidden_dims, scale_floor: float = 1e-3):
        super().__init__()
        self.prior, self.likelihood = prior, likelihood
        self.hidden_dims, self.scale_floor = tuple(hidden_dims), scale_floor
        d, k, h = int(torch.Size(data_shape).numel()), prior.latent_dim, hidden_dims[0]
        self.data_shape = tuple(data_shape)
        self.dec = nn.Sequential(
            nn.Linear(prior.embed_dim, h),
            nn.Tanh(),
            nn.Linear(h, likelihood.params_per_element * d),
        )
        self.family = prior.guide_family()
        self.enc = nn.Sequential(
            nn.Linear(d, h), nn.Tanh(), nn.Linear(h, self.family.num_params * k)
        )

    @pyro_method
    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", self.prior())
            out = self.dec(self.prior.embed(z))
            out = out.reshape(*z.shape[:-1], self.likelihood.params_per_element, *self.data_shape)
            pyro.sample("x", self.likelihood(out), obs=x)

    @pyro_method
    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            raw = self.enc(x.reshape(x.shape[0], -1))
            params = self.family.constrain(raw, self.prior.latent_dim)
            pyro.sample("z", self.family.build(**params))
