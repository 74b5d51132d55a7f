r"""The likelihood contract: a module mapping decoder output to :math:`p(x \mid z)`.

A likelihood states how many decoder outputs it needs per data element
(:attr:`Likelihood.params_per_element`, P), so decoders are sized automatically. The decoder
returns a tensor of shape ``(*batch, P, *data_shape)``; :meth:`Likelihood.forward` turns it into a
distribution with batch shape ``batch`` and event shape ``data_shape``.

A likelihood also declares the data it accepts (:attr:`Likelihood.support`) and checks data
before training (:meth:`Likelihood.check_data`) with a message that suggests a better fit.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch.distributions import constraints

from ..errors import ConfigError
from ..options import RecordsOptions


def check_data_shape(data_shape: Any) -> tuple[int, ...]:
    """Validate a data shape (``(D,)`` or ``(C, H, W)``) and return it as a tuple of ints."""
    try:
        shape = tuple(int(s) for s in data_shape)
    except TypeError as e:
        raise ConfigError(f"`data_shape` must be a tuple of ints, got {data_shape!r}") from e
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"`data_shape` must be non-empty with positive sizes, got {shape}")
    return shape


class Likelihood(RecordsOptions, PyroModule):
    r"""Base class of likelihoods :math:`p(x \mid \eta)`, :math:`\eta` = decoder output.

    Args:
        data_shape: shape of one data point, ``(D,)`` or ``(C, H, W)``.

    Attributes:
        params_per_element: P, decoder outputs per data element.
        support: the constraint data must satisfy.
        support_text: the support in words, for error messages.
    """

    params_per_element: int = 1
    support: constraints.Constraint = constraints.real
    support_text: str = "real numbers"

    def __init__(self, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.data_shape = check_data_shape(data_shape)

    @property
    def event_dim(self) -> int:
        return len(self.data_shape)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split decoder output ``(*batch, P, *data_shape)`` into P tensors ``(*batch, *data_shape)``."""
        dim = -(self.event_dim + 1)
        if out.dim() < self.event_dim + 1 or out.shape[dim] != self.params_per_element:
            raise ConfigError(
                f"{type(self).__name__} expects decoder output (*batch, "
                f"{self.params_per_element}, {', '.join(map(str, self.data_shape))}), "
                f"got {tuple(out.shape)}"
            )
        if self.params_per_element == 1:
            # A view both ways: unbind's backward would copy the gradient into a new tensor.
            return (out.squeeze(dim),)
        return out.unbind(dim)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        """Return p(x | decoder output) with event shape ``data_shape``."""
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x | decoder output], used for reconstructions and sample figures."""
        return self.forward(out).mean

    def log_prob_sum(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        r"""The scalar :math:`\sum_{n} \log p(x_n \mid \eta_n)` over every point of the batch.

        Equal to ``self(out).log_prob(x).sum()``, which is the default. The training loss's fast
        path (:mod:`ppl_vae.inference.fastpath`) calls this, so a likelihood may override it with a fused
        form that builds no distribution; the override must agree with the default to float
        rounding, value and gradient, and should defer to it while Pyro's validation is on
        (see :class:`~ppl_vae.models.likelihoods.bernoulli.BernoulliLikelihood`).
        """
        return self(out).log_prob(x).sum()

    # -- data checks -------------------------------------------------------------------------
    def suggestion(self, x: torch.Tensor) -> str:
        """A hint appended to the support error (which likelihood fits the data instead)."""
        return ""

    def check_data(self, x: torch.Tensor, name: str = "data") -> None:
        """Reject data outside :attr:`support` with a message naming a better likelihood."""
        ok = self.support.check(x)
        if not bool(ok.all()):
            bad = x[~ok]
            hint = self.suggestion(x)
            raise ConfigError(
                f"{name} does not fit the {type(self).__name__}: it expects {self.support_text}, "
                f"got values in [{float(x.min()):.4g}, {float(x.max()):.4g}] "
                f"({bad.numel()} of {x.numel()} outside, e.g. {float(bad.flatten()[0]):.4g})"
                + (f"; {hint}" if hint else "")
            )
