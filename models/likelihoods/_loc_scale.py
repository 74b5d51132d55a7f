r"""Shared machinery of location-scale likelihoods (Normal, Laplace, ...): the scale modes.

The decoder gives the location; the scale is fixed, one learned value, one learned value per data
element, or predicted by the decoder (P = 2):
:math:`s_i = \mathrm{softplus}(r_i + c) + s_{\min}` with :math:`c` chosen so that :math:`r_i = 0`
gives ``init_scale``. Raw outputs are clamped to [-30, 30] so the scale stays finite and positive.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroParam
from torch.distributions import constraints

from ..errors import ConfigError
from .base import Likelihood

SCALE_MODES = ("fixed", "shared", "per-element", "predicted")


class LocScaleLikelihood(Likelihood):
    """Base of likelihoods ``family(loc=decoder output, scale)``; subclasses set ``family``."""

    family: type[dist.Distribution] = dist.Normal
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
        if scale not in SCALE_MODES:
            raise ConfigError(f"`scale` must be one of {list(SCALE_MODES)}, got {scale!r}")
        if not init_scale > 0 or not math.isfinite(init_scale):
            raise ConfigError(f"`init_scale` must be positive, got {init_scale!r}")
        if scale != "fixed":
            low = 0 if scale != "predicted" else math.nextafter(0.0, 1.0)
            if not low <= min_scale < init_scale:
                interval = "[0, init_scale)" if low == 0 else "(0, init_scale)"
                raise ConfigError(f"`min_scale` must be in {interval}, got {min_scale!r}")
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
            scale = F.softplus(raw.clamp(-30.0, 30.0) + self._offset) + self.min_scale
            return loc, scale
        (loc,) = self.split(out)
        return loc, self.scale.expand(loc.shape)

    def forward(self, out: torch.Tensor) -> dist.Distribution:
        loc, scale = self._loc_scale(out)
        return self.family(loc, scale).to_event(self.event_dim)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._loc_scale(out)[0]

    def suggestion(self, x: torch.Tensor) -> str:
        return "the data contain NaN or infinite values: remove or impute them"
