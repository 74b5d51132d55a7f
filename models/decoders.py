r"""Decoders: networks from latent features (and an optional label) to likelihood parameters.

A decoder maps ``h`` of shape ``(*batch, in_dim)`` (the prior's :meth:`embed` of z) to a tensor
of shape ``(*batch, P, *data_shape)``, P being the likelihood's ``params_per_element``. Any
number of leading batch dimensions is allowed (vectorised particles add one).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError


def mlp(in_dim: int, hidden_dims: Sequence[int], out_dim: int) -> nn.Sequential:
    """``Linear -> ReLU`` per hidden layer, then a final ``Linear`` (a linear map if no hidden)."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden_dims:
        if int(h) <= 0:
            raise ConfigError(f"`hidden_dims` must be positive integers, got {list(hidden_dims)}")
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def check_conv_shape(data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The convolutional networks take ``(C, H, W)`` images with H and W divisible by 4."""
    if len(data_shape) != 3 or data_shape[1] % 4 or data_shape[2] % 4:
        raise ConfigError(
            "the convolutional networks need images of shape (C, H, W) with H and W divisible "
            f"by 4 (e.g. (1, 28, 28), (3, 32, 32)), got {tuple(data_shape)}; use --network mlp"
        )
    c, h, w = data_shape
    return c, h, w


class MLPDecoder(nn.Module):
    r"""Fully connected decoder :math:`\eta = f_\theta([h, y])`.

    Args:
        in_dim: width of the latent features (the prior's ``embed_dim``).
        data_shape: shape of one data point.
        params_per_element: P, outputs per data element (from the likelihood).
        hidden_dims: hidden layer widths; ``()`` gives a linear map.
        cond_dim: width of an optional conditioning vector (one-hot label), 0 for none.
    """

    def __init__(
        self,
        in_dim: int,
        data_shape: tuple[int, ...],
        params_per_element: int = 1,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.params_per_element = int(params_per_element)
        self.cond_dim = int(cond_dim)
        numel = int(torch.Size(self.data_shape).numel())
        self.net = mlp(in_dim + self.cond_dim, hidden_dims, self.params_per_element * numel)

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            h = torch.cat([h, y.expand(*h.shape[:-1], y.shape[-1])], dim=-1)
        out = self.net(h)
        return out.reshape(*out.shape[:-1], self.params_per_element, *self.data_shape)


class ConvDecoder(nn.Module):
    r"""Convolutional decoder for ``(C, H, W)`` images, H and W divisible by 4.

    ``Linear -> (64, H/4, W/4) -> ConvTranspose(64, 32) -> ConvTranspose(32, P*C)``.

    Args:
        in_dim: width of the latent features.
        data_shape: ``(C, H, W)``.
        params_per_element: P.
        hidden_dims: widths of fully connected layers before the deconvolutions.
        cond_dim: width of an optional conditioning vector.
        channels: feature maps of the two deconvolution stages.
    """

    def __init__(
        self,
        in_dim: int,
        data_shape: tuple[int, ...],
        params_per_element: int = 1,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
        channels: tuple[int, int] = (64, 32),
    ) -> None:
        super().__init__()
        c, h, w = check_conv_shape(tuple(data_shape))
        self.data_shape = (c, h, w)
        self.params_per_element = int(params_per_element)
        self.cond_dim = int(cond_dim)
        self.start = (channels[0], h // 4, w // 4)
        self.fc = nn.Sequential(
            mlp(in_dim + self.cond_dim, hidden_dims, channels[0] * (h // 4) * (w // 4)), nn.ReLU()
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(channels[1], self.params_per_element * c, 4, stride=2, padding=1),
        )

    def forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            h = torch.cat([h, y.expand(*h.shape[:-1], y.shape[-1])], dim=-1)
        batch = h.shape[:-1]
        out = self.deconv(self.fc(h.reshape(-1, h.shape[-1])).reshape(-1, *self.start))
        return out.reshape(*batch, self.params_per_element, *self.data_shape)
