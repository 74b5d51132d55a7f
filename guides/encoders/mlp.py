r"""Fully connected encoder for data of any shape (flattened)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...models.decoders.base import NORMS, check_options, mlp_trunk
from ...models.distributions.family import VariationalFamily
from .base import Encoder


class MLPEncoder(Encoder):
    r"""Fully connected encoder for data of any shape (flattened).

    ``Linear -> [norm] -> activation -> [dropout]`` per hidden layer, then the family head.
    With the defaults the hidden layers are ``Linear -> ReLU``.

    Args:
        data_shape: shape of one data point.
        latent_dim: D.
        family: the variational family of q(z|x).
        hidden_dims: hidden widths; ``()`` gives a linear map to the head.
        cond_dim: width of an optional conditioning vector (one-hot label).
        activation: one of ``relu``, ``softplus``, ``tanh``, ``elu``, ``gelu``, ``silu``,
            ``leaky_relu``.
        dropout: dropout probability after each hidden activation, in [0, 1).
        norm: ``"none"``, ``"batch"`` or ``"layer"`` normalisation before each activation.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        latent_dim: int,
        family: VariationalFamily,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__(data_shape, latent_dim, family, cond_dim)
        activation, dropout, norm = check_options(activation, dropout, norm, NORMS)
        numel = int(torch.Size(self.data_shape).numel())
        self.trunk, feature_dim = mlp_trunk(
            numel, hidden_dims, activation=activation, dropout=dropout, norm=norm
        )
        self.init_head(feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(*batch, *data_shape) -> (*batch, feature_dim)``."""
        self.check_input(x)
        return self.trunk(x.reshape(*x.shape[: x.dim() - len(self.data_shape)], -1))
