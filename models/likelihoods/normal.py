r"""Normal likelihood with a fixed scale, one learned scale, a learned scale per element, or a
scale predicted by the decoder."""

from __future__ import annotations

import pyro.distributions as dist

from ._loc_scale import LocScaleLikelihood


class NormalLikelihood(LocScaleLikelihood):
    r"""Diagonal Gaussian, :math:`p(x \mid \eta) = \prod_i \mathcal{N}(x_i;\, \eta_i, \sigma_i^2)`.

    Args:
        data_shape: shape of one data point.
        scale: ``"fixed"`` (:math:`\sigma` = ``init_scale``), ``"shared"`` (one learned
            :math:`\sigma`), ``"per-element"`` (one learned :math:`\sigma_i` per data element) or
            ``"predicted"`` (the decoder outputs a raw scale too, P = 2).
        init_scale: the fixed value or the initial learned value; must be positive. ``None``
            (the default): the training data's pooled standard deviation,
            :math:`\sqrt{\frac1D \sum_i \mathrm{Var}(x_i)}` (see
            :meth:`~ppl_vae.models.likelihoods._loc_scale.LocScaleLikelihood.initialize_from_data`).
        min_scale: floor on a learned :math:`\sigma` (positive for ``"predicted"``).
    """

    family = dist.Normal
