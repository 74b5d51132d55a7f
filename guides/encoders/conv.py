r"""Convolutional encoder for ``(C, H, W)`` images with H and W divisible by 4."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...models.decoders.base import (
    CONV_NORMS,
    check_conv_shape,
    check_options,
    check_positive_ints,
    conv_block,
    fc_norm,
    flat_apply,
    mlp_trunk,
)
from ...models.distributions.family import VariationalFamily
from .base import Encoder


class ConvEncoder(Encoder):
    r"""Convolutional encoder for ``(C, H, W)`` images with H and W divisible by 4.

    ``Conv(C, c0, 4, 2) -> Conv(c0, c1, 4, 2) -> MLP(hidden_dims) -> head``, each convolution
    and hidden layer followed by ``[norm] -> activation -> [dropout]``.

    Args:
        data_shape: ``(C, H, W)``.
        latent_dim: D.
        family: the variational family of q(z|x).
        hidden_dims: widths of the fully connected layers after the convolutions.
        cond_dim: width of an optional conditioning vector.
        channels: feature maps ``(c0, c1)`` of the two convolution stages.
        activation: one of ``relu``, ``softplus``, ``tanh``, ``elu``, ``gelu``, ``silu``,
            ``leaky_relu``.
        dropout: dropout probability after each hidden activation, in [0, 1).
        norm: ``"none"``, ``"batch"``, ``"group"`` or ``"layer"`` before each activation (the
            fully connected layers use layer normalisation for ``"group"``).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        latent_dim: int,
        family: VariationalFamily,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
        *,
        channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "none",
    ) -> None:
        super().__init__(data_shape, latent_dim, family, cond_dim)
        c, h, w = check_conv_shape(self.data_shape)
        activation, dropout, norm = check_options(activation, dropout, norm, CONV_NORMS)
        c0, c1 = check_positive_ints("channels", channels, 2)
        opts = {"activation": activation, "dropout": dropout, "norm": norm}
        self.conv = nn.Sequential(
            nn.Conv2d(c, c0, 4, stride=2, padding=1),
            *conv_block(c0, **opts),
            nn.Conv2d(c0, c1, 4, stride=2, padding=1),
            *conv_block(c1, **opts),
            nn.Flatten(),
        )
        self.fc, feature_dim = mlp_trunk(
            c1 * (h // 4) * (w // 4), hidden_dims, **{**opts, "norm": fc_norm(norm)}
        )
        self.init_head(feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(*batch, C, H, W) -> (*batch, feature_dim)``."""
        self.check_input(x)
        return flat_apply(lambda v: self.fc(self.conv(v)), x, 3)
