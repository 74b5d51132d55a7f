r"""Encoders: amortised :math:`q(z \mid x)` (or :math:`q(z \mid x, y)`) whose ``forward`` returns it.

The output head is built from the variational family (by default, one that mirrors the prior):
``latent_dim`` raw outputs per family parameter, clamped and mapped onto the parameter's support
with :func:`torch.distributions.biject_to`, then handed to ``family.build``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from ..models.decoders import check_conv_shape, mlp
from ..models.distributions.family import VariationalFamily
from ..models.errors import ConfigError


class Encoder(nn.Module):
    r"""Base class: a feature network ``features(x)`` followed by the family head.

    .. math:: q_\phi(z \mid x) = \mathcal{F}\big(\psi(\mathrm{head}([f_\phi(x), y]))\big)

    Subclasses define :meth:`features` and set ``feature_dim``.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        latent_dim: int,
        family: VariationalFamily,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.data_shape = tuple(data_shape)
        self.latent_dim = int(latent_dim)
        self.family = family
        self.cond_dim = int(cond_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, x: torch.Tensor) -> None:
        n = len(self.data_shape)
        if tuple(x.shape[-n:]) != self.data_shape or x.dim() < n + 1:
            raise ConfigError(
                f"data has shape {tuple(x.shape)} but the encoder was built for "
                f"(N, {', '.join(map(str, self.data_shape))})"
            )

    def params(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Constrained parameters of q(z | x, y), each ``(N, latent_dim)``."""
        h = self.features(x)
        if y is not None:
            h = torch.cat([h, y], dim=-1)
        return self.family.constrain(self.head(h), self.latent_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dist.Distribution:
        """Return q(z | x[, y]) with batch shape ``(N,)`` and event shape ``(latent_dim,)``."""
        return self.family.build(**self.params(x, y))


class MLPEncoder(Encoder):
    r"""Fully connected encoder for data of any shape (flattened).

    Args:
        data_shape: shape of one data point.
        latent_dim: D.
        family: the variational family of q(z|x).
        hidden_dims: hidden widths; ``()`` gives a linear map to the head.
        cond_dim: width of an optional conditioning vector (one-hot label).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        latent_dim: int,
        family: VariationalFamily,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
    ) -> None:
        super().__init__(data_shape, latent_dim, family, cond_dim)
        numel = int(torch.Size(self.data_shape).numel())
        hidden = tuple(int(h) for h in hidden_dims)
        if hidden:
            self.trunk: nn.Module = nn.Sequential(mlp(numel, hidden[:-1], hidden[-1]), nn.ReLU())
            self.feature_dim = hidden[-1]
        else:
            self.trunk = nn.Identity()
            self.feature_dim = numel
        self.head = nn.Linear(self.feature_dim + self.cond_dim, family.num_params * self.latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.trunk(x.reshape(*x.shape[: x.dim() - len(self.data_shape)], -1))


class ConvEncoder(Encoder):
    r"""Convolutional encoder for ``(C, H, W)`` images with H and W divisible by 4.

    ``Conv(C, 32, 4, 2) -> Conv(32, 64, 4, 2) -> MLP(hidden_dims) -> head``.

    Args:
        data_shape: ``(C, H, W)``.
        latent_dim: D.
        family: the variational family of q(z|x).
        hidden_dims: widths of the fully connected layers after the convolutions.
        cond_dim: width of an optional conditioning vector.
        channels: feature maps of the two convolution stages.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        latent_dim: int,
        family: VariationalFamily,
        hidden_dims: Sequence[int] = (256,),
        cond_dim: int = 0,
        channels: tuple[int, int] = (32, 64),
    ) -> None:
        super().__init__(data_shape, latent_dim, family, cond_dim)
        c, h, w = check_conv_shape(self.data_shape)
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        flat = channels[1] * (h // 4) * (w // 4)
        hidden = tuple(int(k) for k in hidden_dims)
        if hidden:
            self.fc: nn.Module = nn.Sequential(mlp(flat, hidden[:-1], hidden[-1]), nn.ReLU())
            self.feature_dim = hidden[-1]
        else:
            self.fc = nn.Identity()
            self.feature_dim = flat
        self.head = nn.Linear(self.feature_dim + self.cond_dim, family.num_params * self.latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        batch = x.shape[:-3]
        h = self.fc(self.conv(x.reshape(-1, *self.data_shape)))
        return h.reshape(*batch, -1)
