r"""Discretised logistic (mixture) on the grid :math:`\{0, \tfrac{1}{K-1}, \dots, 1\}`.

The distribution of PixelCNN++ (Salimans et al. 2017) for quantised data rescaled to [0, 1]:
level :math:`x_k = k / (K - 1)` receives the logistic mass of the bin
:math:`[x_k - h, x_k + h]`, :math:`h = \tfrac{1}{2(K-1)}`, and the two edge bins extend to
:math:`\pm\infty`, so the :math:`K` masses sum to one exactly.

Numerics. PixelCNN++ computes :math:`\sigma(a) - \sigma(b)` in probability space and, where that
difference falls below 1e-5, replaces it by the density at the bin centre times the bin width.
Here the bin mass is computed in log space in a form that needs no fallback:

.. math:: \log\big(\sigma(a) - \sigma(b)\big)
    = -\mathrm{softplus}(-a) - \mathrm{softplus}(b) + \log\big(1 - e^{-(a - b)}\big),

with :math:`a - b = 2h/s` computed directly (not as a difference of two large numbers). Each
term is accurate wherever it is finite, so the log mass is accurate for every location and
scale, including masses far below float32's smallest number (e.g. :math:`\log p = -10^4`), where
the density fallback of PixelCNN++ is only an approximation.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from ..errors import ConfigError

#: How far (in data units) a value may be from the grid and still count as on it.
GRID_TOLERANCE = 1e-4


class QuantizedUnitInterval(constraints.Constraint):
    r"""Values :math:`k / (K - 1)`, :math:`k = 0, \dots, K - 1`, within :data:`GRID_TOLERANCE`."""

    is_discrete = True
    event_dim = 0

    def __init__(self, num_levels: int, tol: float = GRID_TOLERANCE) -> None:
        self.num_levels = int(num_levels)
        self.tol = float(tol)
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        top = self.num_levels - 1
        level = (value * top).round().clamp(0, top)
        return (value - level / top).abs() <= self.tol

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_levels={self.num_levels})"


def check_num_levels(num_levels: int | None) -> int:
    """Return ``num_levels`` as an int, or raise :class:`ConfigError` unless it is an integer >= 2."""
    if num_levels is None:
        raise ConfigError(
            "`num_levels` must be an integer >= 2, got None (the data set does not say how many "
            "levels its values take: pass num_levels, or use a continuous likelihood)"
        )
    if (
        isinstance(num_levels, bool)
        or not isinstance(num_levels, (int, float))
        or int(num_levels) != num_levels
        or num_levels < 2
    ):
        raise ConfigError(f"`num_levels` must be an integer >= 2, got {num_levels!r}")
    return int(num_levels)


class DiscretizedLogistic(TorchDistribution):
    r"""Mixture of :math:`M` discretised logistics per element on a grid of :math:`K` levels.

    .. math:: P(x_k) = \sum_{m=1}^M \pi_m \Big[\sigma\Big(\frac{x_k + h - \mu_m}{s_m}\Big)
        - \sigma\Big(\frac{x_k - h - \mu_m}{s_m}\Big)\Big],
        \quad \sigma(\tfrac{x_0 - h - \mu}{s}) := 0,\ \sigma(\tfrac{x_{K-1} + h - \mu}{s}) := 1

    Args:
        loc: :math:`\mu`, shape ``(*batch,)``, or ``(*batch, M)`` with ``mixture_logits``.
        scale: :math:`s > 0`, broadcastable with ``loc``.
        num_levels: :math:`K \ge 2`, the grid :math:`x_k = k / (K - 1)`.
        mixture_logits: unnormalised :math:`\log \pi`, ``(*batch, M)``; ``None`` for one
            component.

    Attributes ``loc``, ``scale`` and ``mixture_logits`` are stored with the component
    dimension last, ``(*batch, M)`` (M = 1 without a mixture).

    Example:
        >>> d = DiscretizedLogistic(torch.tensor(0.5), torch.tensor(0.1), num_levels=17)
        >>> round(float(d.log_prob(d.enumerate_support()).exp().sum()), 6)
        1.0

    References:
        Salimans, T., Karpathy, A., Chen, X. and Kingma, D. P. (2017). PixelCNN++: improving the
        PixelCNN with discretized logistic mixture likelihood and other modifications. ICLR.
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "mixture_logits": constraints.real,
    }
    has_enumerate_support = True
    has_rsample = False

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        num_levels: int = 256,
        mixture_logits: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.num_levels = check_num_levels(num_levels)
        if mixture_logits is None:
            shape = torch.Size((*torch.broadcast_shapes(loc.shape, scale.shape), 1))
            loc, scale = loc.unsqueeze(-1), scale.unsqueeze(-1)
            mixture_logits = loc.new_zeros(shape)
        else:
            if mixture_logits.dim() == 0:
                raise ConfigError(
                    "`mixture_logits` must have the component dimension last, got a scalar"
                )
            shape = torch.broadcast_shapes(loc.shape, scale.shape, mixture_logits.shape)
        self.loc = loc.expand(shape)
        self.scale = scale.expand(shape)
        self.mixture_logits = mixture_logits.expand(shape)
        super().__init__(shape[:-1], validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size, _instance: DiscretizedLogistic | None = None
    ) -> DiscretizedLogistic:
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.loc.shape[-1:]
        new.num_levels = self.num_levels
        new.loc = self.loc.expand(shape)
        new.scale = self.scale.expand(shape)
        new.mixture_logits = self.mixture_logits.expand(shape)
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @constraints.dependent_property(is_discrete=True, event_dim=0)
    def support(self) -> constraints.Constraint:
        return QuantizedUnitInterval(self.num_levels)

    @property
    def num_mixtures(self) -> int:
        return self.loc.shape[-1]

    def _grid(self) -> torch.Tensor:
        top = self.num_levels - 1
        return torch.arange(self.num_levels, dtype=self.loc.dtype, device=self.loc.device) / top

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log bin mass of each component, ``(*sample, *batch, M)``; ``value`` is ``(*sample, *batch)``."""
        top = self.num_levels - 1
        half = 0.5 / top
        x = value.unsqueeze(-1)
        inv_scale = self.scale.reciprocal()
        centered = x - self.loc
        upper = (centered + half) * inv_scale  # a: standardised upper bin edge
        lower = (centered - half) * inv_scale  # b: standardised lower bin edge
        # Which level each value is (robust to values a rounding error off the grid).
        level = (x * top).round()
        is_top = level >= top
        is_bottom = level <= 0
        zero = torch.zeros_like(upper)
        log_cdf_upper = torch.where(is_top, zero, -F.softplus(-upper))
        log_sf_lower = torch.where(is_bottom, zero, -F.softplus(lower))
        log_width = torch.log(-torch.expm1(-2.0 * half * inv_scale))
        log_width = torch.where(is_top | is_bottom, zero, log_width)
        return log_cdf_upper + log_sf_lower + log_width

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_mix = F.log_softmax(self.mixture_logits, dim=-1)
        return torch.logsumexp(self.component_log_prob(value) + log_mix, dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        r"""Exact mean over the grid.

        Summation by parts turns :math:`\sum_k x_k P(x_k)` into
        :math:`1 - \frac{1}{K-1}\sum_{k=0}^{K-2} F(x_k + h)` per component, evaluated in chunks of
        levels so memory stays at a few times the parameters' size.
        """
        top = self.num_levels - 1
        edges = (
            torch.arange(top, dtype=self.loc.dtype, device=self.loc.device) + 0.5
        ) / top  # x_k + h, k = 0..K-2
        loc, inv_scale = self.loc.unsqueeze(-1), self.scale.reciprocal().unsqueeze(-1)
        chunk = max(1, (1 << 22) // max(1, self.loc.numel()))
        cdf_sum = torch.zeros_like(self.loc)
        for start in range(0, top, chunk):
            cdf_sum = cdf_sum + torch.sigmoid((edges[start : start + chunk] - loc) * inv_scale).sum(
                -1
            )
        component_mean = 1.0 - cdf_sum / top
        return (F.softmax(self.mixture_logits, dim=-1) * component_mean).sum(-1)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        top = self.num_levels - 1
        with torch.no_grad():
            full = shape + self.loc.shape[-1:]
            if self.num_mixtures == 1:
                loc, scale = self.loc[..., 0].expand(shape), self.scale[..., 0].expand(shape)
            else:
                gumbel = -torch.log(
                    -torch.log(self.loc.new_empty(full).uniform_().clamp_min(1e-20))
                )
                index = (self.mixture_logits + gumbel).argmax(-1, keepdim=True)
                loc = self.loc.expand(full).gather(-1, index).squeeze(-1)
                scale = self.scale.expand(full).gather(-1, index).squeeze(-1)
            u = self.loc.new_empty(shape).uniform_()
            y = loc + scale * (torch.log(u) - torch.log1p(-u))  # logistic; u = 0 gives -inf -> 0
            return (y.clamp(0.0, 1.0) * top).round() / top

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        values = self._grid().reshape((-1,) + (1,) * len(self.batch_shape))
        if expand:
            values = values.expand((-1, *self.batch_shape))
        return values
