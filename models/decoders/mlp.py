r"""Fully connected decoder for data of any shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import NORMS, Decoder, check_options, mlp


class MLPDecoder(Decoder):
    r"""Fully connected decoder :math:`\eta = f_\theta([h, y])`.

    ``Linear -> [norm] -> activation -> [dropout]`` per hidden layer, then a ``Linear`` to
    ``P * prod(data_shape)`` outputs. With the defaults the hidden layers are ``Linear -> ReLU``.

    Args:
        in_dim: width of the latent features (the prior's ``embed_dim``).
        data_shape: shape of one data point.
        params_per_element: P, outputs per data element (from the likelihood).
        hidden_dims: hidden layer widths; ``()`` gives a linear map.
        cond_dim: width of an optional conditioning vector (one-hot label), 0 for none.
        activation: one of ``relu``, ``softplus``, ``tanh``, ``elu``, ``gelu``, ``silu``,
            ``leaky_relu``.
        dropout: dropout probability after each hidden activation, in [0, 1).
        norm: ``"none"``, ``"batch"`` or ``"layer"`` normalisation before each activation.
    """

    def __init__(
        self,
        in_dim: int,
        data_shape: tuple[int, ...],
        params_per_element: int = 1,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__(in_dim, data_shape, params_per_element, cond_dim)
        activation, dropout, norm = check_options(activation, dropout, norm, NORMS)
        self.net = mlp(
            self.in_dim + self.cond_dim,
            hidden_dims,
            self.out_features,
            activation=activation,
            dropout=dropout,
            norm=norm,
        )

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(*batch, in_dim) -> (*batch, P, *data_shape)``."""
        return self.unflatten(self.net(self.condition(h, y)))
