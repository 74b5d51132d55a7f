r"""Discretised logistic (mixture) likelihood for quantised data such as 8-bit images."""

from __future__ import annotations

import pyro.distributions as dist
import torch

from ..distributions.discretized_logistic import (
    GRID_TOLERANCE,
    DiscretizedLogistic,
    QuantizedUnitInterval,
    check_num_levels,
)
from ..errors import ConfigError
from .base import Likelihood


def _detect_levels(x: torch.Tensor, max_levels: int = 65536) -> int | None:
    """The number of levels K of a grid ``k / (K - 1)`` that ``x`` (in [0, 1]) lies on, if any."""
    values = torch.unique(x.detach().flatten())
    if values.numel() < 2 or values.numel() > max_levels:
        return None
    gap = float((values[1:] - values[:-1]).min())
    levels = round(1.0 / gap) + 1
    if levels > max_levels or not bool(QuantizedUnitInterval(levels).check(values).all()):
        return None
    return levels


class DiscretizedLogisticLikelihood(Likelihood):
    r"""Per-element mixture of discretised logistics on the grid :math:`x = k/(K-1)` (PixelCNN++).

    .. math:: p(x \mid \eta) = \prod_i \sum_{m=1}^M \pi_{im} \Big[
        \sigma\Big(\frac{x_i + h - \mu_{im}}{s_{im}}\Big)
        - \sigma\Big(\frac{x_i - h - \mu_{im}}{s_{im}}\Big)\Big], \quad h = \frac{1}{2(K-1)}

    with the edge bins extended to :math:`\pm\infty`. Each data element (channel, row, column)
    has its own independent mixture: unlike PixelCNN++, the colour channels of a pixel are not
    coupled through their means (the decoder's shared features couple them instead).

    The decoder outputs, per element, ``(mu, log_s)`` for one component (P = 2) or
    ``(logit_1..M, mu_1..M, log_s_1..M)`` for ``num_mixtures = M > 1`` (P = 3M). ``log_s`` is
    clamped to ``[min_log_scale, max_log_scale]`` (PixelCNN++ uses a floor of -7): a finite range
    keeps :math:`1/s` finite whatever the decoder emits.

    Args:
        data_shape: shape of one data point.
        num_levels: K, the number of quantisation levels (256 for 8-bit images, 17 for scikit-learn
            digits). Data must be ``k / (K - 1)``; the engine passes the data set's value.
        num_mixtures: M, components per element (e.g. 10 for colour images such as SVHN).
        min_log_scale: lower clamp of :math:`\log s`.
        max_log_scale: upper clamp of :math:`\log s`.

    References:
        Salimans, T., Karpathy, A., Chen, X. and Kingma, D. P. (2017). PixelCNN++: improving the
        PixelCNN with discretized logistic mixture likelihood and other modifications. ICLR.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        num_levels: int = 256,
        num_mixtures: int = 1,
        min_log_scale: float = -7.0,
        max_log_scale: float = 7.0,
    ) -> None:
        super().__init__(data_shape)
        self.num_levels = check_num_levels(num_levels)
        if isinstance(num_mixtures, bool) or int(num_mixtures) != num_mixtures or num_mixtures < 1:
            raise ConfigError(f"`num_mixtures` must be a positive integer, got {num_mixtures!r}")
        if not min_log_scale < max_log_scale:
            raise ConfigError(
                f"`min_log_scale` must be below `max_log_scale`, got {min_log_scale!r} "
                f">= {max_log_scale!r}"
            )
        self.num_mixtures = int(num_mixtures)
        self.min_log_scale = float(min_log_scale)
        self.max_log_scale = float(max_log_scale)
        self.params_per_element = 2 if self.num_mixtures == 1 else 3 * self.num_mixtures
        self.support = QuantizedUnitInterval(self.num_levels)
        self.support_text = (
            f"values on the grid {{0, 1/{self.num_levels - 1}, ..., 1}} in [0, 1] "
            f"(num_levels={self.num_levels}, tolerance {GRID_TOLERANCE:g})"
        )

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        parts = self.split(out)
        if self.num_mixtures == 1:
            loc, raw_log_scale = parts
            mixture_logits = None
        else:
            m = self.num_mixtures
            mixture_logits = torch.stack(parts[:m], dim=-1)
            loc = torch.stack(parts[m : 2 * m], dim=-1)
            raw_log_scale = torch.stack(parts[2 * m :], dim=-1)
        scale = raw_log_scale.clamp(self.min_log_scale, self.max_log_scale).exp()
        d = DiscretizedLogistic(loc, scale, self.num_levels, mixture_logits)
        return d.to_event(self.event_dim)

    def suggestion(self, x: torch.Tensor) -> str:
        if not bool(torch.isfinite(x).all()):
            return "the data contain NaN or infinite values: remove or impute them"
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            if lo >= 0 and bool((x == x.round()).all()):
                return (
                    f"the data look like integer levels 0..{hi:.0f}: divide by num_levels - 1 "
                    f"(e.g. 255 for 8-bit images) so that x = k / (num_levels - 1)"
                )
            return "data outside [0, 1]: use --likelihood normal (or laplace), or rescale"
        levels = _detect_levels(x)
        if levels is not None:
            return f"the data lie on a grid of {levels} levels: set num_levels={levels}"
        return (
            "the data in [0, 1] are not quantised: use --likelihood continuous-bernoulli "
            "or --likelihood normal, or set num_levels to the data's number of levels"
        )
