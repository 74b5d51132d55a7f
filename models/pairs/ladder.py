r"""A Ladder VAE (``--model ladder``): top-down inference that shares the generative path,
Sønderby et al. (2016).

.. math:: q(z_{1:L} \mid x) = q(z_L \mid x) \prod_{l=1}^{L-1} q(z_l \mid z_{l+1}, x), \qquad
    q(z_l \mid z_{l+1}, x) \propto \mathcal{N}(z_l;\, \hat\mu_l, \hat\sigma_l^2)\,
    \mathcal{N}(z_l;\, \mu_{p,l}(z_{l+1}), \sigma_{p,l}^2(z_{l+1}))

With ``lower_latent_dims=[]`` (L = 1) it is the built-in VAE, network for network.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import pyro_method
from torch import nn

from ...guides.encoders.mlp import MLPEncoder
from ..likelihoods.base import Likelihood
from ..priors.base import Prior
from ._layers import (
    BottomUpPass,
    HierarchyBase,
    StochasticLayer,
    precision_weighted,
    site_name,
)


class LadderVAE(HierarchyBase):
    r"""L stochastic layers :math:`z_L \to \dots \to z_1 \to x`, inferred top-down.

    A deterministic bottom-up pass :math:`d_1 = f_1(x)`, :math:`d_l = f_l(d_{l-1})` gives per
    layer :math:`\hat\mu_l = W_l d_l`, :math:`\hat\sigma_l = \operatorname{softplus}(V_l d_l) +
    \sigma_{\min}`. The guide then samples top-down: :math:`q(z_L \mid x)` from the top's head
    (the prior's ``guide_family()``, so a von Mises top is inferred as one), and for
    :math:`l = L-1, \dots, 1`

    .. math:: \sigma_{q,l}^2 = \big(\hat\sigma_l^{-2} + \sigma_{p,l}^{-2}\big)^{-1}, \quad
        \mu_{q,l} = \sigma_{q,l}^2 \big(\hat\mu_l \hat\sigma_l^{-2}
        + \mu_{p,l} \sigma_{p,l}^{-2}\big),

    where :math:`(\mu_{p,l}, \sigma_{p,l})` are the parameters of the model's own
    :math:`p(z_l \mid z_{l+1})` at the guide's draw of :math:`z_{l+1}`, computed by the same
    modules (``generative``) the model uses. Sample sites ``"z1"`` ... ``"zL"`` and ``"x"``,
    inside ``pyro.plate("data")``; the guide samples them in the model's order.

    Networks: :math:`f_1` and the first head are the shipped
    :class:`~ppl_vae.guides.encoders.mlp.MLPEncoder` (``hidden_dims``), :math:`z_1 \to x` the
    shipped :class:`~ppl_vae.models.decoders.mlp.MLPDecoder`; :math:`f_l` for l >= 2 are MLPs
    of widths ``layer_hidden_dims`` (reversed in the generative direction).

    Args:
        data_shape: shape of one data point (from the engine).
        prior: :math:`p(z_L)`; its ``latent_dim`` is the top layer's width (``--latent-dim``).
        likelihood: :math:`p(x \mid \cdot)` for ``data_shape``.
        hidden_dims: widths of the deterministic layers between x and :math:`z_1`.
        lower_latent_dims: widths of :math:`z_1, \dots, z_{L-1}`, bottom first; ``[]`` gives
            L = 1, the built-in VAE.
        layer_hidden_dims: widths of the deterministic layers between two stochastic layers.
        activation: the hidden units' activation everywhere.
        min_scale: :math:`\sigma_{\min}`, the floor of the Gaussian layers' scales.
        norm: ``"none"``, ``"batch"`` or ``"layer"`` normalisation before every hidden
            activation, in all networks (Sønderby et al. 2016 train the ladder with batch
            normalisation); with ``"batch"``, evaluation uses the running statistics.

    References:
        Sønderby, Raiko, Maaløe, Sønderby, Winther (2016), Ladder variational autoencoders,
        NeurIPS.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        prior: Prior,
        likelihood: Likelihood,
        hidden_dims: Sequence[int] = (256, 128),
        lower_latent_dims: list[int] | tuple[int, ...] = (),
        layer_hidden_dims: list[int] | tuple[int, ...] = (),
        activation: str = "relu",
        min_scale: float = 1e-3,
        norm: str = "none",
    ) -> None:
        super().__init__(
            data_shape,
            prior,
            likelihood,
            hidden_dims,
            lower_latent_dims,
            layer_hidden_dims,
            activation,
            min_scale,
            norm,
        )
        top, family = self.num_layers, self.layer_family
        # d_1 and the estimates of layer 1: the built-in VAE's encoder (build_networks' arguments)
        encoder = MLPEncoder(
            data_shape=self.data_shape,
            latent_dim=self.latent_dims[0],
            family=family(1),
            hidden_dims=self.hidden_dims,
            cond_dim=0,
            activation=activation,
            norm=self.norm,
        )
        # d_l = f_l(d_{l-1}) and the estimates of layer l, l = 2 .. L
        up: list[StochasticLayer] = []
        width = encoder.feature_dim
        for layer in range(2, top + 1):
            up.append(
                StochasticLayer(
                    width,
                    self.latent_dims[layer - 1],
                    family(layer),
                    self.layer_hidden_dims,
                    activation,
                    self.norm,
                )
            )
            width = up[-1].feature_dim
        self.inference = BottomUpPass(encoder, up)
        self.attach_prior(self.inference)

    @property
    def encoder(self) -> MLPEncoder:
        """The bottom-up pass's first network (x to the estimates of layer 1)."""
        return self.inference.encoder

    @property
    def up(self) -> nn.ModuleList:
        """The bottom-up pass's networks above the first, ``up[l - 2]`` for layer ``l``."""
        return self.inference.up

    # -- inference ---------------------------------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        r"""The deterministic pass: per layer, bottom first, the head's parameters
        (:math:`\hat\mu_l, \hat\sigma_l` as ``loc``/``scale``; the top's in its family's names)."""
        return self.inference.estimates(x)

    def posterior(
        self, layer: int, estimate: dict[str, torch.Tensor], z_above: torch.Tensor
    ) -> dist.Distribution:
        r""":math:`q(z_{layer} \mid z_{layer+1}, x)` below the top: the bottom-up ``estimate``
        of the layer merged with the model's :math:`p(z_{layer} \mid z_{layer+1})` by precision."""
        p = self.generative[layer - 1].params(self.embed(layer + 1, z_above))
        loc, scale = precision_weighted(estimate["loc"], estimate["scale"], p["loc"], p["scale"])
        return self.generative[layer - 1].family.build(loc=loc, scale=scale)

    @pyro_method
    def guide(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""``z_L ~ q(z_L | x)``, then ``z_l ~ q(z_l | z_{l+1}, x)`` down to ``z_1``, inside
        ``plate("data")``. Returns the draws by site."""
        estimates = self.bottom_up(x)
        top = self.num_layers
        draws: dict[str, torch.Tensor] = {}
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(site_name(top), self.inference.top_family.build(**estimates[-1]))
            draws[site_name(top)] = z
            for layer in range(top - 1, 0, -1):
                z = pyro.sample(site_name(layer), self.posterior(layer, estimates[layer - 1], z))
                draws[site_name(layer)] = z
        return draws
