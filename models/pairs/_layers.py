r"""Building blocks of the shipped hierarchical pairs (:mod:`.hierarchical`, :mod:`.ladder`).

Both pairs share one generative path,

.. math:: p(x, z_{1:L}) = p(z_L) \prod_{l=1}^{L-1} p(z_l \mid z_{l+1})\; p(x \mid z_1),

with :math:`p(z_L)` any :class:`~ppl_vae.models.priors.base.Prior` (the decoder of the layer
below reads ``prior.embed(z_L)``), diagonal Gaussian conditionals :math:`p(z_l \mid z_{l+1})`
(:class:`StochasticLayer` with a :class:`GaussianFamily`) and :math:`p(x \mid z_1)` the shipped
MLP decoder followed by the likelihood. :class:`HierarchyBase` holds that path, its Pyro
``model(x)``, the option checks and the conveniences figures use; each pair adds its inference
networks and ``guide(x)``.

With one stochastic layer (``lower_latent_dims=[]``) the path is exactly the built-in VAE's:
the shipped :class:`~ppl_vae.models.decoders.mlp.MLPDecoder` on ``prior.embed(z)`` with the
hidden widths reversed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from ..decoders.base import check_options, check_positive_ints, mlp_trunk
from ..decoders.mlp import MLPDecoder
from ..distributions.family import VariationalFamily
from ..distributions.normal import Normal
from ..errors import ConfigError
from ..likelihoods.base import Likelihood, check_data_shape
from ..options import RecordsOptions
from ..priors.base import Prior

__all__ = [
    "BottomUpPass",
    "GaussianFamily",
    "HierarchyBase",
    "StochasticLayer",
    "check_min_scale",
    "precision_weighted",
    "site_name",
]


def site_name(layer: int) -> str:
    """The sample site of stochastic layer ``layer`` (1 = next to x): ``"z1"``, ``"z2"``, ..."""
    return f"z{layer}"


def check_min_scale(min_scale: Any) -> float:
    """``min_scale`` as a positive finite float, else ConfigError."""
    ok = isinstance(min_scale, numbers.Real) and not isinstance(min_scale, bool)
    if not ok or not math.isfinite(float(min_scale)) or float(min_scale) <= 0:
        raise ConfigError(f"`min_scale` must be a positive finite number, got {min_scale!r}")
    return float(min_scale)


def precision_weighted(
    loc_a: torch.Tensor, scale_a: torch.Tensor, loc_b: torch.Tensor, scale_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The product of two Gaussians, normalised: Sønderby et al.'s (2016) precision-weighted merge.

    .. math:: \sigma^2 = \frac{1}{\sigma_a^{-2} + \sigma_b^{-2}}, \qquad
        \mu = \sigma^2 \big(\mu_a \sigma_a^{-2} + \mu_b \sigma_b^{-2}\big)

    Returns:
        ``(loc, scale)``, broadcast over the inputs.
    """
    prec_a, prec_b = scale_a.pow(-2), scale_b.pow(-2)
    var = 1.0 / (prec_a + prec_b)
    return (loc_a * prec_a + loc_b * prec_b) * var, var.sqrt()


class GaussianFamily(VariationalFamily):
    r"""Diagonal Gaussian :math:`\mathcal{N}(\mu, \operatorname{diag}\sigma^2)` of a hidden layer.

    .. math:: \mu = r_\mu, \qquad \sigma = \operatorname{softplus}(r_\sigma) + \sigma_{\min}

    Softplus grows linearly, so a large raw output cannot overflow the scale, and the floor keeps
    :math:`\log\sigma` bounded below (Burda et al. and Sønderby et al. use such a floor).

    Args:
        min_scale: :math:`\sigma_{\min} > 0`.
    """

    def __init__(self, min_scale: float = 1e-3) -> None:
        super().__init__()
        self.min_scale = check_min_scale(min_scale)
        self.param_constraints["loc"] = constraints.real
        self.param_constraints["scale"] = constraints.positive

    def constrain(self, raw: torch.Tensor, latent_dim: int) -> dict[str, torch.Tensor]:
        """``(..., 2 D)`` raw outputs -> ``{"loc": (..., D), "scale": (..., D)}``."""
        if raw.shape[-1] != 2 * latent_dim:
            raise ConfigError(
                f"a Gaussian layer of width {latent_dim} needs {2 * latent_dim} raw outputs, "
                f"got {raw.shape[-1]}"
            )
        loc, raw_scale = raw.split(latent_dim, dim=-1)
        return {"loc": loc, "scale": F.softplus(raw_scale) + self.min_scale}

    def build(self, **params: torch.Tensor) -> dist.Distribution:
        return Normal(params["loc"], params["scale"]).to_event(1)

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale:g}"


class StochasticLayer(nn.Module):
    r"""A conditional distribution over a ``latent_dim``-vector given features ``h``.

    .. math:: p(z \mid h) = \mathcal{F}\big(\psi(W\, f(h) + b)\big)

    ``f`` is an MLP trunk (``Linear -> activation`` per hidden width, the identity for ``()``),
    the head emits ``family.num_params * latent_dim`` raw numbers and the family maps them to its
    parameters (:meth:`VariationalFamily.constrain`) and builds the distribution.

    Args:
        in_dim: width of ``h``.
        latent_dim: D, the width of z.
        family: the distribution family (:class:`GaussianFamily`, or a prior's guide family).
        hidden_dims: the trunk's widths.
        activation: a name in :data:`~ppl_vae.models.decoders.base.ACTIVATIONS`.
        norm: ``"none"``, ``"batch"`` or ``"layer"`` normalisation before each of the trunk's
            activations.
    """

    def __init__(
        self,
        in_dim: int,
        latent_dim: int,
        family: VariationalFamily,
        hidden_dims: Sequence[int] = (),
        activation: str = "relu",
        norm: str = "none",
    ) -> None:
        super().__init__()
        self.in_dim, self.latent_dim = int(in_dim), int(latent_dim)
        self.family = family
        self.trunk, self.feature_dim = mlp_trunk(
            in_dim, hidden_dims, activation=activation, norm=norm
        )
        self.head = nn.Linear(self.feature_dim, family.num_params * self.latent_dim)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """``(*batch, in_dim) -> (*batch, feature_dim)``, the trunk's output."""
        return self.trunk(h)

    def params_from_features(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's constrained parameters, each ``(*batch, latent_dim)``, from features."""
        return self.family.constrain(self.head(f), self.latent_dim)

    def params(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's constrained parameters given ``h``."""
        return self.params_from_features(self.features(h))

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        """The distribution given ``h``: batch shape ``h.shape[:-1]``, event shape ``(D,)``."""
        return self.family.build(**self.params(h))


class BottomUpPass(nn.Module):
    r"""A Ladder VAE's deterministic bottom-up pass, and :math:`q(z_L \mid x)` as one network.

    .. math:: d_1 = f_1(x), \quad d_l = f_l(d_{l-1}), \qquad
        (\hat\mu_l, \hat\sigma_l) = \mathrm{head}_l(d_l)

    Args:
        encoder: :math:`f_1` and the first head (the shipped MLP encoder of x).
        up: :math:`f_l` and head :math:`l` for ``l = 2 .. L`` (:class:`StochasticLayer`\ s
            whose ``in_dim`` is the feature width below).

    Attributes:
        cond_dim: 0 (q reads x alone), for priors built from the encoder.
    """

    cond_dim = 0

    def __init__(self, encoder: nn.Module, up: Sequence[StochasticLayer]) -> None:
        super().__init__()
        self.encoder = encoder
        self.up = nn.ModuleList(up)
        self.data_shape = tuple(encoder.data_shape)
        self.latent_dims = (int(encoder.latent_dim), *(layer.latent_dim for layer in up))
        self.latent_dim = self.latent_dims[-1]

    @property
    def top_family(self) -> VariationalFamily:
        r"""The family of :math:`q(z_L \mid x)` (the prior's guide family)."""
        return self.up[-1].family if len(self.up) else self.encoder.family

    def estimates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        r"""Per layer, bottom first, the head's constrained parameters: :math:`\hat\mu_l,
        \hat\sigma_l` as ``loc``/``scale`` below the top, the top family's at the top."""
        d = self.encoder.features(x)
        out = [self.encoder.family.constrain(self.encoder.head(d), self.latent_dims[0])]
        for layer in self.up:
            d = layer.features(d)
            out.append(layer.params_from_features(d))
        return out

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        r""":math:`q(z_L \mid x)`: batch shape ``(N,)``, event shape ``(D_L,)``."""
        return self.top_family.build(**self.estimates(x)[-1])


class HierarchyBase(RecordsOptions, PyroModule):
    r"""The generative path :math:`z_L \to \dots \to z_1 \to x` shared by the hierarchical pairs.

    .. math:: p(x, z_{1:L}) = p(z_L) \prod_{l=1}^{L-1} p(z_l \mid z_{l+1})\; p(x \mid z_1)

    Attributes:
        prior: :math:`p(z_L)`.
        likelihood: :math:`p(x \mid \cdot)`.
        generative: ``generative[l - 1]`` is :math:`p(z_l \mid z_{l+1})`, a
            :class:`StochasticLayer` reading ``embed(z_{l+1})``, for ``l = 1 .. L-1``.
        decoder: the shipped MLP decoder from :math:`z_1` (``prior.embed(z_1)`` when L = 1).
        latent_dims: widths of :math:`z_1, \dots, z_L`, bottom first.
        sites: sample-site names, bottom first (``["z1", ..., "zL"]``).

    Subclasses build their inference networks and define ``guide(x)``.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        prior: Prior,
        likelihood: Likelihood,
        hidden_dims: Sequence[int],
        lower_latent_dims: Sequence[int],
        layer_hidden_dims: Sequence[int],
        activation: str,
        min_scale: float,
        norm: str = "none",
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self._data_shape = check_data_shape(data_shape)
        if not isinstance(prior, Prior):
            raise ConfigError(
                f"{name} needs a built Prior instance as `prior`, got {type(prior).__name__}"
            )
        if not isinstance(likelihood, Likelihood):
            raise ConfigError(
                f"{name} needs a built Likelihood instance as `likelihood`, "
                f"got {type(likelihood).__name__}"
            )
        if tuple(likelihood.data_shape) != self._data_shape:
            raise ConfigError(
                f"likelihood built for data shape {tuple(likelihood.data_shape)} but {name} "
                f"for {self._data_shape}"
            )
        self.hidden_dims = check_positive_ints("hidden_dims", hidden_dims)
        self.lower_latent_dims = check_positive_ints("lower_latent_dims", lower_latent_dims)
        self.layer_hidden_dims = check_positive_ints("layer_hidden_dims", layer_hidden_dims)
        self.activation, _, self.norm = check_options(activation, 0.0, norm)
        self.min_scale = check_min_scale(min_scale)
        self.prior = prior
        self.likelihood = likelihood
        self.latent_dims = (*self.lower_latent_dims, prior.latent_dim)
        self.sites = [site_name(layer) for layer in range(1, self.num_layers + 1)]
        # p(z_l | z_{l+1}), l = 1 .. L-1, each reading embed(z_{l+1})
        self.generative = nn.ModuleList(
            StochasticLayer(
                self.embed_dim(layer + 1),
                self.latent_dims[layer - 1],
                GaussianFamily(self.min_scale),
                self.layer_hidden_dims[::-1],
                activation,
                self.norm,
            )
            for layer in range(1, self.num_layers)
        )
        # p(x | z_1): the built-in VAE's decoder (build_networks' constructor arguments)
        self.decoder = MLPDecoder(
            in_dim=self.embed_dim(1),
            data_shape=self._data_shape,
            params_per_element=likelihood.params_per_element,
            hidden_dims=self.hidden_dims[::-1],
            cond_dim=0,
            activation=activation,
            norm=self.norm,
        )

    def layer_family(self, layer: int) -> VariationalFamily:
        """q's family at ``layer``: the prior's own at the top, a diagonal Gaussian below."""
        if layer == self.num_layers:
            return self.prior.guide_family()
        return GaussianFamily(self.min_scale)

    def attach_prior(self, top_encoder: nn.Module | None, why_none: str = "") -> None:
        r"""Hand the prior the network of :math:`q(z_L \mid x)` (``prior.attach``, for a prior
        built from the encoder such as the VampPrior), then check it.

        Args:
            top_encoder: a module mapping x to :math:`q(z_L \mid x)`, or None where the pair
                has none.
            why_none: the reason there is none, for the error a prior that needs it gets.
        """
        attach = getattr(self.prior, "attach", None)
        name, prior_name = type(self).__name__, type(self.prior).__name__
        if top_encoder is not None:
            if callable(attach):
                attach(encoder=top_encoder, data_shape=self.data_shape)
            self.prior.validate()
            return
        try:
            self.prior()
        except ConfigError as e:
            raise ConfigError(
                f"prior {prior_name} cannot be the top of {name} with {self.num_layers} layers: "
                f"{why_none} ({e})"
            ) from None

    # -- sizes -------------------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        return self._data_shape

    @property
    def num_layers(self) -> int:
        """L, the number of stochastic layers."""
        return len(self.latent_dims)

    @property
    def latent_dim(self) -> int:
        """Width of the top layer :math:`z_L` (the prior's)."""
        return self.prior.latent_dim

    def embed_dim(self, layer: int) -> int:
        """Width of what the layer below reads from :math:`z_{layer}` (the prior's embedding
        at the top, z itself below)."""
        return self.prior.embed_dim if layer == self.num_layers else self.latent_dims[layer - 1]

    def embed(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """What the layer below reads from a draw of :math:`z_{layer}`."""
        return self.prior.embed(z) if layer == self.num_layers else z

    def check_input(self, x: torch.Tensor) -> None:
        """Reject data whose per-point shape is not the one the networks were built for."""
        shape = self._data_shape
        if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != shape:
            raise ConfigError(
                f"data has shape {tuple(x.shape)} but the model was built for "
                f"(N, {', '.join(map(str, shape))})"
            )

    # -- the generative program --------------------------------------------------------------
    def conditional(self, layer: int, z_above: torch.Tensor) -> dist.Distribution:
        r""":math:`p(z_{layer} \mid z_{layer+1})` given a draw of the layer above."""
        return self.generative[layer - 1](self.embed(layer + 1, z_above))

    @pyro_method
    def model(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""``z_L ~ p(z_L)``, ``z_l ~ p(z_l | z_{l+1})``, ``x ~ p(x | decoder(z_1))``, all inside
        ``plate("data")``, so every point draws every layer afresh. Returns the draws by site."""
        draws: dict[str, torch.Tensor] = {}
        with pyro.plate("data", x.shape[0], dim=-1):
            top = self.num_layers
            z = pyro.sample(site_name(top), self.prior())
            draws[site_name(top)] = z
            for layer in range(top - 1, 0, -1):
                z = pyro.sample(site_name(layer), self.conditional(layer, z))
                draws[site_name(layer)] = z
            pyro.sample("x", self.likelihood(self.decoder(self.embed(1, z))), obs=x)
        return draws

    # -- conveniences (no Pyro state) --------------------------------------------------------
    def decode(self, z1: torch.Tensor) -> dist.Distribution:
        r""":math:`p(x \mid z_1)` for draws of the bottom layer ``(..., D_1)``."""
        return self.likelihood(self.decoder(self.embed(1, z1)))

    def decode_mean(self, z1: torch.Tensor) -> torch.Tensor:
        r""":math:`\mathbb{E}[x \mid z_1]`, the likelihood's mean."""
        return self.likelihood.mean(self.decoder(self.embed(1, z1)))

    @torch.no_grad()
    def sample_latents(self, n: int) -> dict[str, torch.Tensor]:
        """``n`` ancestral draws of every layer from the model, by site (each ``(n, D_l)``)."""
        top = self.num_layers
        z = self.prior().sample((n,))
        draws = {site_name(top): z}
        for layer in range(top - 1, 0, -1):
            z = self.conditional(layer, z).sample()
            draws[site_name(layer)] = z
        return draws

    @torch.no_grad()
    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``n`` samples, every layer drawn afresh per sample: ``(z_L, E[x | z_1])``."""
        draws = self.sample_latents(n)
        return draws[site_name(self.num_layers)], self.decode_mean(draws[site_name(1)])
