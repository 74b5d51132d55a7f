r"""A hierarchical VAE with bottom-up inference (``--model hierarchical``), Burda et al. (2016).

.. math:: p(x, z_{1:L}) = p(z_L) \prod_{l=1}^{L-1} p(z_l \mid z_{l+1})\; p(x \mid z_1), \qquad
    q(z_{1:L} \mid x) = q(z_1 \mid x) \prod_{l=2}^{L} q(z_l \mid z_{l-1})

With ``lower_latent_dims=[]`` (L = 1) it is the built-in VAE, network for network.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
from pyro.nn import pyro_method
from torch import nn

from ...guides.encoders.mlp import MLPEncoder
from ..likelihoods.base import Likelihood
from ..priors.base import Prior
from ._layers import HierarchyBase, StochasticLayer, site_name


class HierarchicalVAE(HierarchyBase):
    r"""L stochastic layers :math:`z_L \to \dots \to z_1 \to x`, inferred bottom-up.

    .. math:: q(z_{1:L} \mid x) = q(z_1 \mid x) \prod_{l=2}^{L} q(z_l \mid z_{l-1})

    :math:`p(z_L)` is ``prior`` (any shipped or user prior) and :math:`q(z_L \mid z_{L-1})` (or
    :math:`q(z_1 \mid x)` when L = 1) its ``guide_family()``, so a von Mises top layer has a von
    Mises posterior. The layers below are diagonal Gaussians (softplus scale plus ``min_scale``)
    in both programs. Sample sites ``"z1"`` ... ``"zL"`` (top ``"zL"``) and ``"x"``, inside
    ``pyro.plate("data")``.

    Networks: ``x -> z_1`` is the shipped :class:`~ppl_vae.guides.encoders.mlp.MLPEncoder` and
    ``z_1 -> x`` the shipped :class:`~ppl_vae.models.decoders.mlp.MLPDecoder` with
    ``hidden_dims`` (reversed in the decoder), built as the built-in VAE builds them; between
    stochastic layers, MLPs of widths ``layer_hidden_dims`` (reversed in the generative
    direction).

    Args:
        data_shape: shape of one data point (from the engine).
        prior: :math:`p(z_L)`; its ``latent_dim`` is the top layer's width (``--latent-dim``).
        likelihood: :math:`p(x \mid \cdot)` for ``data_shape``.
        hidden_dims: widths of the deterministic layers between x and :math:`z_1`
            (``--hidden-dims``).
        lower_latent_dims: widths of :math:`z_1, \dots, z_{L-1}`, bottom first; ``[]`` gives
            L = 1, the built-in VAE.
        layer_hidden_dims: widths of the deterministic layers between two stochastic layers.
        activation: the hidden units' activation everywhere (``tanh`` in Burda et al.).
        min_scale: the floor of the hidden Gaussian layers' scales.
        norm: ``"none"``, ``"batch"`` or ``"layer"`` normalisation before every hidden
            activation, in all networks; with ``"batch"``, evaluation uses the running
            statistics.

    Example:
        Burda et al.'s two-layer MNIST model (784-100-50 stochastic units, 200-200 and 100-100
        tanh units)::

            HierarchicalVAE((1, 28, 28), GaussianPrior(50), BernoulliLikelihood((1, 28, 28)),
                            hidden_dims=[200, 200], lower_latent_dims=[100],
                            layer_hidden_dims=[100, 100], activation="tanh")

    References:
        Burda, Grosse, Salakhutdinov (2016), Importance weighted autoencoders, ICLR.
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
        # q(z_1 | x): the built-in VAE's encoder (build_networks' constructor arguments)
        self.encoder = MLPEncoder(
            data_shape=self.data_shape,
            latent_dim=self.latent_dims[0],
            family=family(1),
            hidden_dims=self.hidden_dims,
            cond_dim=0,
            activation=activation,
            norm=self.norm,
        )
        # q(z_l | z_{l-1}), l = 2 .. L
        self.inference = nn.ModuleList(
            StochasticLayer(
                self.latent_dims[layer - 2],
                self.latent_dims[layer - 1],
                family(layer),
                self.layer_hidden_dims,
                activation,
                self.norm,
            )
            for layer in range(2, top + 1)
        )
        self.attach_prior(
            self.encoder if top == 1 else None,
            "bottom-up inference has no single network for q(z_L | x) (it draws the layers "
            "below first); use --model ladder, whose q(z_L | x) is one bottom-up pass, or "
            "lower_latent_dims=[]",
        )

    @pyro_method
    def guide(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        r"""``z_1 ~ q(z_1 | x)``, then ``z_l ~ q(z_l | z_{l-1})`` up to the top, inside
        ``plate("data")``. Returns the draws by site."""
        draws: dict[str, torch.Tensor] = {}
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample(site_name(1), self.encoder(x))
            draws[site_name(1)] = z
            for layer in range(2, self.num_layers + 1):
                z = pyro.sample(site_name(layer), self.inference[layer - 2](z))
                draws[site_name(layer)] = z
        return draws
