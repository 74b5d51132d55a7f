r"""Units for log-likelihoods: nats per data point and bits per dimension.

Conventions. Log-likelihoods are reported in nats per data point everywhere. For image data the
literature also reports the *negative* log-likelihood in bits per dimension (bpd), lower is
better. How to convert depends on what the likelihood is:

* a probability mass function (Bernoulli on binarised pixels, discretised logistic on the grid
  :math:`k/(K-1)`): :math:`\mathrm{bpd} = -\log P(x) / (D \ln 2)`;
* a density on data rescaled from the integer levels :math:`\{0, \dots, K-1\}` to [0, 1] by
  :math:`x = y / (K-1)` (continuous Bernoulli, Normal, Laplace): the same density on the
  original scale is :math:`p_y(y) = p_x(y/(K-1)) / (K-1)` per dimension, so

  .. math:: \mathrm{bpd} = \frac{-\log p_x(x) / D + \ln(K - 1)}{\ln 2}.

  This is the usual change-of-variables correction. It is an exact bound on the discrete
  data's bpd only when the density is fitted to uniformly dequantised data (Theis et al. 2016);
  for a density evaluated at the grid points themselves it is an approximation, and not
  comparable with a pmf's bpd in general (a density can exceed 1 and gives negative bpd).
"""

from __future__ import annotations

import math

from ..errors import ConfigError


def bits_per_dim(nats_per_point: float, num_dims: int, num_levels: int | None = 256) -> float:
    r"""Convert a negative log-likelihood in nats per data point to bits per dimension.

    .. math:: \mathrm{bpd} = \frac{\mathrm{NLL}/D + \ln(K - 1)}{\ln 2}
        \quad (\text{no } \ln(K - 1) \text{ term when } K \text{ is None})

    Args:
        nats_per_point: :math:`\mathrm{NLL} = -\log p(x)` in nats per data point (positive for a
            pmf; the negative of the log-likelihood the engine reports).
        num_dims: D, the number of elements of one data point (e.g. 3 * 32 * 32).
        num_levels: K for a *density* on data rescaled from K integer levels to [0, 1] by
            ``x = k / (K - 1)``, adding the change-of-variables term :math:`\ln(K - 1)` per
            dimension. Pass ``None`` for a pmf (discrete likelihood: Bernoulli, discretised
            logistic), which needs no correction.

    Returns:
        Bits per dimension.

    Raises:
        ConfigError: ``num_dims < 1``, ``num_levels < 2``, or a negative NLL with
            ``num_levels=None`` (a pmf's NLL cannot be negative: most likely the log-likelihood
            was passed instead of its negative).

    Example:
        >>> bits_per_dim(784 * math.log(2), 784, None)
        1.0
    """
    if isinstance(num_dims, bool) or int(num_dims) != num_dims or num_dims < 1:
        raise ConfigError(f"`num_dims` must be a positive integer, got {num_dims!r}")
    nats = float(nats_per_point)
    if num_levels is None:
        if nats < 0:
            raise ConfigError(
                f"`nats_per_point` of a pmf is a negative log-likelihood and cannot be negative, "
                f"got {nats!r} (pass -log p(x), not log p(x))"
            )
        return nats / (num_dims * math.log(2.0))
    if isinstance(num_levels, bool) or int(num_levels) != num_levels or num_levels < 2:
        raise ConfigError(f"`num_levels` must be an integer >= 2 or None, got {num_levels!r}")
    return (nats / num_dims + math.log(num_levels - 1)) / math.log(2.0)
