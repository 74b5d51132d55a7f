"""Likelihoods p(x|z), one module per family. ``--likelihood NAME`` loads ``ppl_vae.models.likelihoods.NAME``.

A module here defines exactly one :class:`~ppl_vae.models.likelihoods.base.Likelihood` subclass.
"""

from .base import Likelihood, check_data_shape

__all__ = ["Likelihood", "check_data_shape"]
