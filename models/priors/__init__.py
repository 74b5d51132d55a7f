"""Priors p(z), one module per family. ``--prior NAME`` loads ``ppl_vae.models.priors.NAME``.

A module here defines exactly one :class:`~ppl_vae.models.priors.base.Prior` subclass; adding
a prior is adding a file (and one line in the test catalogue).
"""

from .base import Prior, check_latent_dim

__all__ = ["Prior", "check_latent_dim"]
