r"""Residual convolutional encoder for ``(C, H, W)`` images with H and W divisible by 4."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ...models.decoders.base import (
    CONV_NORMS,
    check_conv_shape,
    check_options,
    check_positive_int,
    check_positive_ints,
    conv_block,
    fc_norm,
    flat_apply,
    mlp_trunk,
    residual_stage,
)
from ...models.distributions.family import VariationalFamily
from .base import Encoder


class ResNetEncoder(Encoder):
    r"""Residual encoder for images, e.g. ``(1, 28, 28)`` or ``(3, 32, 32)`` (SVHN).

    ``Conv3x3(C, c0) -> [blocks(c0 -> c0), /2] -> [blocks(c0 -> c1), /2] -> MLP(hidden_dims)
    -> head``. The first :class:`~ppl_vae.models.decoders.base.ResidualBlock` of each stage
    halves H and W (stride 2) and changes the channels through a 1x1 skip; the others keep them
    with an identity skip. Each block is two 3x3 convolutions with normalisation and the
    activation.

    The default normalisation is ``"group"`` (GroupNorm): it normalises each point on its own,
    so the encoder behaves the same in training and eval mode and with a batch of one, where
    batch normalisation depends on the other points of the batch (or on running averages).

    Args:
        data_shape: ``(C, H, W)``, H and W divisible by 4.
        latent_dim: D.
        family: the variational family of q(z|x).
        hidden_dims: widths of the fully connected layers after the residual stages.
        cond_dim: width of an optional conditioning vector.
        channels: feature maps ``(c0, c1)`` of the two stages.
        blocks: residual blocks per stage, at least 1.
        activation: one of ``relu``, ``softplus``, ``tanh``, ``elu``, ``gelu``, ``silu``,
            ``leaky_relu``.
        dropout: dropout probability inside each block and after each hidden activation.
        norm: ``"group"``, ``"layer"``, ``"batch"`` or ``"none"`` (the fully connected layers
            use layer normalisation for ``"group"``).

    References:
        He, Zhang, Ren, Sun (2016), Deep residual learning for image recognition. CVPR.
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
        blocks: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "group",
    ) -> None:
        super().__init__(data_shape, latent_dim, family, cond_dim)
        c, h, w = check_conv_shape(self.data_shape)
        activation, dropout, norm = check_options(activation, dropout, norm, CONV_NORMS)
        c0, c1 = check_positive_ints("channels", channels, 2)
        blocks = check_positive_int("blocks", blocks)
        opts = {"activation": activation, "dropout": dropout, "norm": norm}
        self.stem = nn.Sequential(
            nn.Conv2d(c, c0, 3, padding=1, bias=norm == "none"), *conv_block(c0, **opts)
        )
        self.stages = nn.Sequential(
            residual_stage(c0, c0, blocks, "down", **opts),
            residual_stage(c0, c1, blocks, "down", **opts),
            nn.Flatten(),
        )
        self.fc, feature_dim = mlp_trunk(
            c1 * (h // 4) * (w // 4), hidden_dims, **{**opts, "norm": fc_norm(norm)}
        )
        self.init_head(feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(*batch, C, H, W) -> (*batch, feature_dim)``."""
        self.check_input(x)
        return flat_apply(lambda v: self.fc(self.stages(self.stem(v))), x, 3)
