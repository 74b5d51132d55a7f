r"""The diagonal Normal family on the real line: :math:`q(z|x) = \mathcal{N}(\mu(x), \sigma(x)^2)`.

The family a Gaussian prior mirrors, here as a component so that it can be chosen for any prior
on the real line (e.g. a Student-t prior with a Normal guide: ``--guide-family normal``).
"""

from __future__ import annotations

from torch.distributions import constraints

from ...models.distributions.family import NormalOnSupport


class NormalFamily(NormalOnSupport):
    """A diagonal Normal with ``loc`` and ``scale`` from the encoder."""

    def __init__(self) -> None:
        super().__init__(constraints.real)
