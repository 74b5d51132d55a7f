r"""VampPrior (Tomczak & Welling 2018): the prior is the model's own posterior at learned inputs.

.. math:: p(z) = \frac1K \sum_{k=1}^{K} q_\phi(z \mid u_k)

with K learned pseudo-inputs :math:`u_k` of the data's shape, passed through the model's own
encoder (so the prior moves with q). The prior is built from the model: :meth:`VampPrior.attach`
receives the encoder and the data shape once the networks exist, and the pseudo-inputs start at
K random training points (:meth:`VampPrior.initialize_from_data`, fresh runs only). q(z|x) is a
diagonal Normal, and so is every mixture component.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from ..distributions.family import NormalOnSupport, VariationalFamily
from ..errors import ConfigError
from .base import Prior


class VampPrior(Prior):
    r"""The variational mixture of posteriors prior.

    Args:
        latent_dim: D.
        num_components: K, the number of pseudo-inputs (the paper uses 500 on MNIST).

    Example:
        >>> from ppl_vae.guides.encoders.mlp import MLPEncoder
        >>> prior = VampPrior(2, num_components=4)
        >>> enc = MLPEncoder((6,), 2, prior.guide_family(), hidden_dims=(8,))
        >>> prior.attach(encoder=enc, data_shape=(6,))
        >>> prior().event_shape
        torch.Size([2])
    """

    def __init__(self, latent_dim: int, num_components: int = 50) -> None:
        super().__init__(latent_dim)
        if isinstance(num_components, bool) or not isinstance(num_components, int):
            raise ConfigError(f"`num_components` must be an integer, got {num_components!r}")
        if num_components < 1:
            raise ConfigError(f"`num_components` must be at least 1, got {num_components}")
        self.num_components = num_components
        self.pseudo_inputs: nn.Parameter | None = None

    def guide_family(self) -> VariationalFamily:
        return NormalOnSupport()

    def attach(self, *, encoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        if getattr(encoder, "cond_dim", 0):
            raise ConfigError(
                "the VampPrior needs an encoder of x alone, q(z|x); this model's encoder also "
                f"reads a conditioning vector of width {encoder.cond_dim} (M2's q(z|x, y))"
            )
        self.__dict__["_encoder"] = encoder  # a reference, not a submodule
        ref = next(iter(encoder.parameters()), torch.zeros(()))
        self.pseudo_inputs = nn.Parameter(
            torch.rand(self.num_components, *data_shape, dtype=ref.dtype, device=ref.device)
        )

    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Start the pseudo-inputs at K training points drawn at random (with replacement when
        there are fewer than K)."""
        if self.pseudo_inputs is None:
            return
        n, k = x.shape[0], self.num_components
        idx = torch.randperm(n)[:k] if n >= k else torch.randint(n, (k,))
        with torch.no_grad():
            self.pseudo_inputs.copy_(x[idx.to(x.device)].to(self.pseudo_inputs))

    def forward(self) -> dist.Distribution:
        encoder = self.__dict__.get("_encoder")
        if encoder is None or self.pseudo_inputs is None:
            raise ConfigError(
                "the VampPrior is built from the model's encoder: call "
                "prior.attach(encoder=..., data_shape=...) once the encoder exists"
            )
        components = encoder(self.pseudo_inputs)  # q(z | u_k): batch (K,), event (D,)
        mix = dist.Categorical(logits=self.pseudo_inputs.new_zeros(self.num_components))
        return dist.MixtureSameFamily(mix, components)

    def validate(self) -> None:
        if self.__dict__.get("_encoder") is not None:  # before attach() there is nothing yet
            super().validate()
