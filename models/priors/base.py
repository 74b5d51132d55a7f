r"""The prior contract: a module whose ``forward()`` returns :math:`p(z)`.

A prior is a :class:`~pyro.nn.PyroModule` whose :meth:`Prior.forward` returns a Pyro distribution
over :math:`z` with event shape ``(latent_dim,)`` and empty batch shape (the model expands it over
the data plate). Fixed hyper-parameters are buffers, learnable ones ``PyroParam``\ s.

Everything else has a default that is right for a Euclidean latent space, and a prior overrides
only what its geometry needs:

* :meth:`Prior.guide_family` - the variational family of q(z|x); mirrors the prior by default,
  and is a Normal on the prior's support for a prior with no parameters to mirror (a mixture,
  a flow: :func:`~ppl_vae.models.distributions.family.family_for`).
* :attr:`Prior.label_conditional` - a prior :math:`p(z \mid y)` of the label (M2): its
  ``forward(y)`` takes one-hot labels ``(..., K)`` and returns a distribution of batch shape
  ``(...)``; the engine gives it ``num_classes`` and refuses it in models without labels.
* :meth:`Prior.log_density` - :math:`\log p(z)` at given codes, ``forward().log_prob(z)`` by
  default; a prior may override it with a cheaper computation of the same value (the standard
  Gaussian: :math:`-\tfrac12\lVert z\rVert^2 - \tfrac D2 \log 2\pi`, with no distribution
  built). The M2 fast path (:mod:`ppl_vae.inference.m2_fastpath`) scores p(z) with it.
* :meth:`Prior.attach` - called once the model's networks exist, with the encoder and the data
  shape, for a prior that is built from them (the VampPrior).
* :meth:`Prior.embed` / :attr:`Prior.embed_dim` - what the decoder reads (von Mises: cos, sin).
* :meth:`Prior.interpolate` - a path between two codes (for the interpolation figure).
* :meth:`Prior.figures` - extra figures suited to the geometry.
* ``traversal_values(quantiles) -> Tensor`` (optional; not defined here) - the values, ``(Q, D)``
  for quantiles ``(Q,)``, that the latent traversal figure sweeps each dimension over, with
  optional ``traversal_grid`` / ``traversal_description`` strings naming them. Without it the
  figures ask p(z)'s distribution for the same hook (von Mises: angles around the circle;
  spike-and-slab: exact quantiles with exact zeros), then take its quantiles
  (:mod:`ppl_vae.latent_figures`).
* :meth:`Prior.anneal` - a hook the trainer calls with progress in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from ..distributions.family import VariationalFamily, family_for
from ..errors import ConfigError
from ..options import RecordsOptions


def check_latent_dim(latent_dim: Any) -> int:
    """Validate ``latent_dim`` and return it as ``int``."""
    if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim <= 0:
        raise ConfigError(f"`latent_dim` must be a positive integer, got {latent_dim!r}")
    return latent_dim


class Prior(RecordsOptions, PyroModule):
    r"""Base class of priors :math:`p(z)`, :math:`z \in \mathbb{R}^D` (or a product manifold).

    Args:
        latent_dim: D, the number of latent dimensions.
    """

    #: Whether p(z) is a density on (a subset of) R^D, so that any guide family on its support
    #: fits it (``--guide-family``). False for a density on the circle (von Mises) or a
    #: distribution with point masses (spike-and-slab): only their own family fits.
    euclidean: bool = True
    #: Whether this is p(z | y): ``forward(y)`` with one-hot labels (see the module docstring).
    label_conditional: bool = False

    def __init__(self, latent_dim: int) -> None:
        if type(self).forward is Prior.forward:
            raise ConfigError(
                f"prior class {type(self).__name__} must define forward() returning p(z)"
            )
        super().__init__()
        self.latent_dim = check_latent_dim(latent_dim)

    def forward(self) -> dist.Distribution:
        """Return p(z): event shape ``(latent_dim,)``, batch shape ``()``."""
        raise NotImplementedError

    def log_density(self, z: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z)` per code, ``(..., D) -> (...)``; for a :attr:`label_conditional`
        prior :math:`\log p(z \mid y)` with ``labels = (y,)``, one-hot ``(..., K)``.

        The default is ``self(*labels).log_prob(z)``. An override must return the same value up
        to float rounding (``tests/models/test_priors.py`` checks every shipped prior against
        its distribution) and may skip building the distribution.
        """
        return self(*labels).log_prob(z)

    # -- the guide ---------------------------------------------------------------------------
    def guide_family(self) -> VariationalFamily:
        """The variational family of q(z|x). Default: the prior's own distribution type, or a
        Normal on its support where it has no ``arg_constraints`` to mirror."""
        return family_for(self.reference(), type(self).__name__)

    def reference(self) -> dist.Distribution:
        """p(z), or for a :attr:`label_conditional` prior p(z | y) at every class (batch
        ``(K,)``): what the checks and the default family read."""
        if self.label_conditional:
            return self.forward(torch.eye(int(self.num_classes)))  # type: ignore[call-arg]
        return self.forward()

    # -- the model around it -------------------------------------------------------------------
    def attach(self, *, encoder: nn.Module, data_shape: tuple[int, ...]) -> None:
        """Hook called once the model's networks are built: ``encoder`` is the model's q(z|x)
        network (an :class:`~ppl_vae.guides.encoders.Encoder`), ``data_shape`` one data point's
        shape. A prior built from them keeps a reference (not a submodule: the encoder's
        parameters stay the model's); the default does nothing."""

    # -- geometry ----------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Width of :meth:`embed`'s output, i.e. of the decoder's input."""
        return self.latent_dim

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """Features of z that the decoder reads, ``(..., D) -> (..., embed_dim)``."""
        return z

    def interpolate(self, z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Codes on the path from ``z0`` to ``z1`` (both ``(D,)``) at times ``t`` ``(T,)``."""
        return z0 + t[:, None] * (z1 - z0)

    def figures(self, z: torch.Tensor, labels: torch.Tensor | None, fig_dir: Path) -> list[Path]:
        """Write geometry-specific figures of posterior codes ``z`` ``(N, D)``; return paths."""
        return []

    def anneal(self, progress: float) -> None:
        """Hook called by the trainer once per step with training progress in [0, 1]."""

    def summary(self, z: torch.Tensor) -> dict[str, float]:
        """Scalar statistics of exact posterior samples ``z`` ``(N, D)`` for ``metrics.json``."""
        return {}

    # -- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check that :meth:`forward` returns a distribution of event shape ``(latent_dim,)``."""
        try:
            d = self.reference()
        except NotImplementedError as e:
            raise ConfigError(f"prior {type(self).__name__} does not implement forward()") from e
        if not isinstance(d, torch.distributions.Distribution):
            raise ConfigError(
                f"prior {type(self).__name__}.forward() must return a distribution, "
                f"got {type(d).__name__}"
            )
        if tuple(d.event_shape) != (self.latent_dim,):
            raise ConfigError(
                f"prior {type(self).__name__} returns a distribution with event shape "
                f"{tuple(d.event_shape)} but latent_dim={self.latent_dim}; expected "
                f"({self.latent_dim},) (use .to_event(1) on a vector of {self.latent_dim} values)"
            )
        want = (int(self.num_classes),) if self.label_conditional else ()  # type: ignore[attr-defined]
        if tuple(d.batch_shape) != want and self.label_conditional:
            raise ConfigError(
                f"prior {type(self).__name__} is p(z | y) but forward(y) for one-hot labels of "
                f"shape ({want[0]}, {want[0]}) returns batch shape {tuple(d.batch_shape)}; "
                f"expected {want}"
            )
        if tuple(d.batch_shape) != want:
            raise ConfigError(
                f"prior {type(self).__name__} returns batch shape {tuple(d.batch_shape)}; "
                "expected () (the model expands p(z) over the data plate)"
            )
