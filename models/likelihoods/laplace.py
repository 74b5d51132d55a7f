r"""Laplace likelihood with a fixed scale, one learned scale, a learned scale per element, or a
scale predicted by the decoder."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..errors import ConfigError
from .base import Likelihood

_SCALES = ("fixed", "shared", "per-element", "predicted")


class LaplaceLikelihood(Likelihood):
    r"""Factorised Laplace, heavier-tailed than the Normal (an L1 reconstruction error).

    .. math:: p(x \mid \eta) = \prod_i \frac{1}{2 b_i} \exp\!\left(-\frac{|x_i - \eta_i|}{b_i}\right)

    Args:
        data_shape: shape of one data point.
        scale: ``"fixed"`` (:math:`b` = ``init_scale``), ``"shared"`` (one learned :math:`b`),
            ``"per-element"`` (one learned :math:`b_i` per data element) or ``"predicted"``
            (the decoder outputs a raw scale too, P = 2;
            :math:`b_i = \mathrm{softplus}(r_i + c) + b_{\min}` with :math:`c` chosen so that
            :math:`r_i = 0` gives ``init_scale``).
        init_scale: the fixed value or the initial learned value; must be positive.
        min_scale: floor on :math:`b` so the likelihood cannot collapse onto a point.
    """

    support = constraints.real
    support_text = "real numbers"

    def __init__(
        self,
        data_shape: tuple[int, ...],
        scale: str = "shared",
        init_scale: float = 0.1,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__(data_shape)
        if scale not in _SCALES:
            raise ConfigError(f"`scale` must be one of {list(_SCALES)}, got {scale!r}")
        if not init_scale > 0:
            raise ConfigError(f"`init_scale` must be positive, got {init_scale!r}")
        if not 0 <= min_scale < init_scale:
            raise ConfigError(f"`min_scale` must be in [0, init_scale), got {min_scale!r}")
        self.scale_mode = scale
        self.min_scale = float(min_scale)
        self.params_per_element = 2 if scale == "predicted" else 1
        if scale == "fixed":
            self.register_buffer("scale", torch.full(self.data_shape, float(init_scale)))
        elif scale in ("shared", "per-element"):
            shape = () if scale == "shared" else self.data_shape
            self.scale = PyroParam(
                torch.full(shape, float(init_scale)),
                constraint=constraints.greater_than(self.min_scale),
            )
        else:
            self._offset = math.log(math.expm1(init_scale - min_scale))

    def _loc_scale(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale_mode == "predicted":
            loc, raw = self.split(out)
            scale = F.softplus(raw.clamp(max=30.0) + self._offset) + self.min_scale
            return loc, scale
        (loc,) = self.split(out)
        return loc, self.scale.expand(loc.shape)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, scale = self._loc_scale(out)
        return dist.Laplace(loc, scale).to_event(self.event_dim)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._loc_scale(out)[0]

    def suggestion(self, x: torch.Tensor) -> str:
        return "the data contain NaN or infinite values: remove or impute them"
