r"""Shared machinery of location-scale likelihoods (Normal, Laplace, ...): the scale modes.

The decoder gives the location; the scale is fixed, one learned value, one learned value per data
element, or predicted by the decoder (P = 2):
:math:`s_i = a\,\mathrm{softplus}(r_i + c) + s_{\min}`, where :math:`r_i = 0` gives the initial
scale: :math:`a = 1` and :math:`c = \mathrm{softplus}^{-1}(s_0 - s_{\min})` for an ``init_scale``
:math:`s_0` (or the default), :math:`a = s_0 - s_{\min}` and :math:`c = \log(e - 1)` for a scale
taken from the data, so that the raw output acts on it multiplicatively whatever the data's units
(the additive form cannot leave :math:`s_0 \pm 30` when :math:`s_0 \gg 30`). Raw outputs are
clamped to [-30, 30] so the scale stays finite and positive.

**Initial scale from the data.** Unless ``init_scale`` is given, the initial (or fixed) scale is
set from the training data by :meth:`LocScaleLikelihood.initialize_from_data`, which the engine
calls once on the training split before a fresh run trains: it is the maximum-likelihood scale of
the family when every element's location is fitted on its own and one scale is shared by all
elements, :math:`s_0 = \sqrt{\tfrac1D \sum_i \mathrm{Var}(x_i)}` for the Normal (the pooled
standard deviation) and :math:`\tfrac{1}{ND} \sum_{n,i} |x_{ni} - \mathrm{median}(x_i)|` for the
Laplace. The ``per-element`` mode starts every element at that same pooled value (an element's own
spread is zero on constant pixels such as the digits' border, where the untrained decoder's output
is still off, and the first loss would be thousands of nats). A constant data set (spread zero)
keeps the default 0.1, and the start is at least twice ``min_scale``. The chosen value lives in
the module's state (parameter or buffer), so a resumed or reopened run loads it instead.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroParam
from torch.distributions import biject_to, constraints

from ..errors import ConfigError
from .base import Likelihood

SCALE_MODES = ("fixed", "shared", "per-element", "predicted")
#: The initial scale before (or without) :meth:`LocScaleLikelihood.initialize_from_data`.
DEFAULT_INIT_SCALE = 0.1


def _inverse_softplus(y: float) -> float:
    """:math:`c` with :math:`\\mathrm{softplus}(c) = y > 0`, without overflow for large y."""
    return y + math.log(-math.expm1(-y))


class LocScaleLikelihood(Likelihood):
    """Base of likelihoods ``family(loc=decoder output, scale)``; subclasses set ``family``.

    Args:
        data_shape: shape of one data point.
        scale: ``"fixed"``, ``"shared"``, ``"per-element"`` or ``"predicted"``.
        init_scale: the fixed value or the initial learned value (positive); ``None`` (the
            default) sets it from the training data (module docstring).
        min_scale: floor on a learned scale (positive for ``"predicted"``).
    """

    family: type[dist.Distribution] = dist.Normal
    support = constraints.real
    support_text = "real numbers"

    def __init__(
        self,
        data_shape: tuple[int, ...],
        scale: str = "shared",
        init_scale: float | None = None,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__(data_shape)
        if scale not in SCALE_MODES:
            raise ConfigError(f"`scale` must be one of {list(SCALE_MODES)}, got {scale!r}")
        self.init_scale_given = init_scale is not None
        if init_scale is None:
            init_scale = DEFAULT_INIT_SCALE
        elif not init_scale > 0 or not math.isfinite(init_scale):
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
            # buffers, so that a data-derived start is saved with the model
            self.register_buffer("scale_factor", torch.tensor(1.0))
            self.register_buffer(
                "scale_offset", torch.tensor(_inverse_softplus(float(init_scale) - self.min_scale))
            )

    # -- the initial scale -------------------------------------------------------------------
    def data_spread(self, x: torch.Tensor) -> float:
        r"""The family's maximum-likelihood scale with per-element locations, pooled.

        For the Normal, :math:`\sqrt{\tfrac1D \sum_i \mathrm{Var}(x_i)}` (variances with
        :math:`1/N`); subclasses with another family override it.

        Args:
            x: training data ``(N, *data_shape)``.
        """
        flat = x.detach().reshape(x.shape[0], -1).double()
        return float(flat.var(0, unbiased=False).mean().sqrt())

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor) -> None:
        """Set the initial (or fixed) scale from the training data unless ``init_scale`` was
        given (module docstring). Called once by the engine, on fresh runs only."""
        if self.init_scale_given or x.shape[0] < 2:
            return
        spread = self.data_spread(x)
        if not math.isfinite(spread) or spread <= 0:
            return  # constant data: keep the default
        value = max(spread, 2 * self.min_scale)
        if self.scale_mode == "fixed":
            self.scale.fill_(value)
        elif self.scale_mode == "predicted":
            self.scale_factor.fill_(value - self.min_scale)
            self.scale_offset.fill_(math.log(math.e - 1.0))  # softplus(c) = 1
        else:
            raw = self.scale_unconstrained
            target = torch.full_like(raw, value)
            raw.copy_(biject_to(constraints.greater_than(self.min_scale)).inv(target))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Runs saved before these were buffers trained with the constructor's values.
        if self.scale_mode == "predicted":
            for name in ("scale_factor", "scale_offset"):
                if prefix + name not in state_dict:
                    state_dict[prefix + name] = getattr(self, name).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the distribution --------------------------------------------------------------------
    def _loc_scale(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale_mode == "predicted":
            loc, raw = self.split(out)
            scale = (
                self.scale_factor * F.softplus(raw.clamp(-30.0, 30.0) + self.scale_offset)
                + self.min_scale
            )
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
