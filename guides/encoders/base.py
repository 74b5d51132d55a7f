r"""The encoder contract: a feature network followed by the variational family's head.

The output head is built from the variational family (by default, one that mirrors the prior):
``latent_dim`` raw outputs per family parameter, clamped and mapped onto the parameter's support
with :func:`torch.distributions.biject_to`, then handed to ``family.build``.

A shipped or user encoder subclasses :class:`Encoder`, builds its feature network, then calls
:meth:`Encoder.init_head` with the feature width. Its constructor takes the context
``(data_shape, latent_dim, family, hidden_dims, cond_dim)`` from the engine and keyword options
from the user (``activation``, ``dropout``, ``norm``, ...).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ...models.distributions.family import VariationalFamily
from ...models.errors import ConfigError


class Encoder(nn.Module):
    r"""Base class: a feature network ``features(x)`` followed by the family head.

    .. math:: q_\phi(z \mid x) = \mathcal{F}\big(\psi(\mathrm{head}([f_\phi(x), y]))\big)

    Subclasses define :meth:`features` (``(*batch, *data_shape) -> (*batch, feature_dim)``) and
    call :meth:`init_head`, which sets ``feature_dim`` and ``head``.

    Args:
        data_shape: shape of one data point.
        latent_dim: D, the width of z.
        family: the variational family of q(z|x).
        cond_dim: width of an optional conditioning vector (one-hot label), 0 for none.
    """

    feature_dim: int
    head: nn.Linear

    def __init__(
        self,
        data_shape: tuple[int, ...],
        latent_dim: int,
        family: VariationalFamily,
        cond_dim: int = 0,
    ) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.latent_dim = int(latent_dim)
        self.family = family
        self.cond_dim = int(cond_dim)
        if self.latent_dim <= 0 or self.cond_dim < 0:
            raise ConfigError(
                "an encoder needs latent_dim > 0 and cond_dim >= 0, got "
                f"{self.latent_dim} and {self.cond_dim}"
            )

    def init_head(self, feature_dim: int) -> None:
        """Set ``feature_dim`` and the head ``Linear(feature_dim + cond_dim, P * latent_dim)``."""
        self.feature_dim = int(feature_dim)
        self.head = nn.Linear(
            self.feature_dim + self.cond_dim, self.family.num_params * self.latent_dim
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(*batch, *data_shape) -> (*batch, feature_dim)``; defined by each subclass."""
        raise NotImplementedError(f"{type(self).__name__} must define features(x)")

    def check_input(self, x: torch.Tensor) -> None:
        """Reject ``x`` whose trailing dimensions are not ``data_shape``, naming both shapes."""
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
