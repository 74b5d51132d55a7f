r"""Laplace likelihood with a fixed scale, one learned scale, a learned scale per element, or a
scale predicted by the decoder."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ._loc_scale import LocScaleLikelihood


class LaplaceLikelihood(LocScaleLikelihood):
    r"""Factorised Laplace, heavier-tailed than the Normal (an L1 reconstruction error).

    .. math:: p(x \mid \eta) = \prod_i \frac{1}{2 b_i} \exp\!\left(-\frac{|x_i - \eta_i|}{b_i}\right)

    Args:
        data_shape: shape of one data point.
        scale: ``"fixed"``, ``"shared"``, ``"per-element"`` or ``"predicted"`` (P = 2), as for
            :class:`~ppl_vae.models.likelihoods.normal.NormalLikelihood`.
        init_scale: the fixed value or the initial learned value; must be positive. ``None``
            (the default): the training data's mean absolute deviation from each element's
            median, pooled over elements (see :meth:`data_spread`).
        min_scale: floor on a learned :math:`b` (positive for ``"predicted"``).
    """

    family = dist.Laplace

    def data_spread(self, x: torch.Tensor) -> float:
        r"""The Laplace's maximum-likelihood scale with per-element locations (the medians),
        pooled: :math:`\tfrac{1}{ND} \sum_{n,i} |x_{ni} - \mathrm{median}(x_i)|`."""
        flat = x.detach().reshape(x.shape[0], -1).double()
        return float((flat - flat.median(0).values).abs().mean())
