r"""Residual convolutional decoder for ``(C, H, W)`` images with H and W divisible by 4."""

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
    check_positive_int,
    check_positive_ints,
    fc_norm,
    mlp,
    residual_stage,
)


class ResNetDecoder(Decoder):
    r"""Residual decoder, the mirror of :class:`~ppl_vae.guides.encoders.ResNetEncoder`.

    ``MLP(hidden_dims) -> (c0, H/4, W/4) -> [up x2, blocks(c0 -> c1)] -> [up x2, blocks(c1 ->
    c1)] -> Conv3x3(c1, P*C)``. Each stage doubles H and W by nearest-neighbour upsampling and
    then applies ``blocks`` :class:`~ppl_vae.models.decoders.base.ResidualBlock`\ s (two 3x3
    convolutions with normalisation and the activation, an identity or 1x1 skip).

    The default normalisation is ``"group"`` (GroupNorm): it normalises each point on its own,
    so the decoder behaves the same in training and eval mode, with a batch of one, and under
    vectorised particles (inputs ``(K, N, in_dim)``), where batch normalisation would mix the
    particles and points of a batch.

    Args:
        in_dim: width of the latent features.
        data_shape: ``(C, H, W)``, H and W divisible by 4.
        params_per_element: P.
        hidden_dims: widths of the fully connected layers before the residual stages.
        cond_dim: width of an optional conditioning vector.
        channels: feature maps ``(c0, c1)`` of the two stages.
        blocks: residual blocks per stage, at least 1.
        activation: one of ``relu``, ``softplus``, ``tanh``, ``elu``, ``gelu``, ``silu``,
            ``leaky_relu``.
        dropout: dropout probability inside each block and after each hidden activation.
        norm: ``"group"``, ``"layer"``, ``"batch"`` or ``"none"`` (the fully connected layers
            use layer normalisation for ``"group"``).
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
        blocks: int = 1,
        activation: str = "relu",
        dropout: float = 0.0,
        norm: str = "group",
    ) -> None:
        c, h, w = check_conv_shape(tuple(data_shape))
        super().__init__(in_dim, (c, h, w), params_per_element, cond_dim)
        activation, dropout, norm = check_options(activation, dropout, norm, CONV_NORMS)
        c0, c1 = check_positive_ints("channels", channels, 2)
        blocks = check_positive_int("blocks", blocks)
        fc_opts = {"activation": activation, "dropout": dropout, "norm": fc_norm(norm)}
        opts = {"activation": activation, "dropout": dropout, "norm": norm}
        self.start = (c0, h // 4, w // 4)
        width = c0 * (h // 4) * (w // 4)
        self.fc = nn.Sequential(
            mlp(self.in_dim + self.cond_dim, hidden_dims, width, **fc_opts),
            *activation_block(width, **fc_opts),
        )
        self.stages = nn.Sequential(
            residual_stage(c0, c1, blocks, "up", **opts),
            residual_stage(c1, c1, blocks, "up", **opts),
        )
        self.out = nn.Conv2d(c1, self.params_per_element * c, 3, padding=1)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(*batch, in_dim) -> (*batch, P, C, H, W)``."""
        h = self.condition(h, y)
        batch = h.shape[:-1]
        x = self.fc(h.reshape(-1, h.shape[-1])).reshape(-1, *self.start)
        out = self.out(self.stages(x))
        return out.reshape(*batch, self.params_per_element, *self.data_shape)
