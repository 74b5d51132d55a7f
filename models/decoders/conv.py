r"""Convolutional decoder for ``(C, H, W)`` images with H and W divisible by 4."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import (
    CONV_NORMS,
    Decoder,
    activation_block,
    check_conv_shape,
    check_options,
    check_positive_ints,
    conv_block,
    fc_norm,
    mlp,
)


class ConvDecoder(Decoder):
    r"""Convolutional decoder for ``(C, H, W)`` images, H and W divisible by 4.

    ``MLP(hidden_dims) -> (c0, H/4, W/4) -> ConvTranspose(c0, c1, 4, 2) -> ConvTranspose(c1, P*C,
    4, 2)``, each hidden layer followed by ``[norm] -> activation -> [dropout]``.

    Args:
        in_dim: width of the latent features.
        data_shape: ``(C, H, W)``.
        params_per_element: P.
        hidden_dims: widths of fully connected layers before the deconvolutions.
        cond_dim: width of an optional conditioning vector.
        channels: feature maps ``(c0, c1)`` of the two deconvolution stages.
        activation: one of ``relu``, ``softplus``, ``tanh``, ``elu``, ``gelu``, ``silu``,
            ``leaky_relu``.
        dropout: dropout probability after each hidden activation, in [0, 1).
        norm: ``"none"``, ``"batch"``, ``"group"`` or ``"layer"`` before each activation (the
            fully connected layers use layer normalisation for ``"group"``).
    """

    def __init__(
        self,
        in_dim: int,
        data_shape: tuple[int, ...],
        params_per_element: int = 1,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
        *,
        channels: Sequence[int] = (64, 32),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        c, h, w = check_conv_shape(tuple(data_shape))
        super().__init__(in_dim, (c, h, w), params_per_element, cond_dim)
        activation, dropout, norm = check_options(activation, dropout, norm, CONV_NORMS)
        c0, c1 = check_positive_ints("channels", channels, 2)
        fc_opts = {"activation": activation, "dropout": dropout, "norm": fc_norm(norm)}
        self.start = (c0, h // 4, w // 4)
        width = c0 * (h // 4) * (w // 4)
        self.fc = nn.Sequential(
            mlp(self.in_dim + self.cond_dim, hidden_dims, width, **fc_opts),
            *activation_block(width, **fc_opts),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(c0, c1, 4, stride=2, padding=1),
            *conv_block(c1, activation=activation, dropout=dropout, norm=norm),
            nn.ConvTranspose2d(c1, self.params_per_element * c, 4, stride=2, padding=1),
        )

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(*batch, in_dim) -> (*batch, P, C, H, W)``."""
        h = self.condition(h, y)
        batch = h.shape[:-1]
        out = self.deconv(self.fc(h.reshape(-1, h.shape[-1])).reshape(-1, *self.start))
        return out.reshape(*batch, self.params_per_element, *self.data_shape)
