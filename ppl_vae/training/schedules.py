r"""KL-weight (beta) schedules: a factor :math:`f_t > 0` of ``--beta`` per step.

* ``linear`` (the default): :math:`f_t = \min(1, (t + 1) / T_w)` with :math:`T_w` the steps of
  ``--warmup-epochs`` (no warm-up: :math:`f_t = 1`), Bowman et al.'s KL annealing.
* ``cyclical`` (Fu et al. 2019): the run's :math:`T` steps are cut into ``cycles`` equal cycles;
  within each, the factor rises linearly from 0 to 1 over the first ``ratio`` of the cycle and
  stays at 1 for the rest: :math:`\tau = (t \bmod P + 1) / P` with :math:`P = \lceil T / M
  \rceil`, :math:`f_t = \min(1, \tau / R)` (the first step of a cycle has :math:`f = 1/(PR)`
  rather than 0, as a site's weight must be positive).
* ``file.py:function`` or ``package.module:function``: a user's function of the step,
  ``function(step, total_steps) -> float`` (keyword options from ``--beta-schedule-arg``), whose
  value (> 0) multiplies ``--beta``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from numbers import Real
from typing import Any

from ..models.errors import ConfigError

__all__ = ["BUILT_IN", "BetaSchedule", "make_beta_schedule"]

BUILT_IN = ("linear", "cyclical")


class BetaSchedule:
    """``schedule(step, steps_per_epoch, total_steps) -> factor`` of the KL weight."""

    def __init__(self, name: str, fn: Callable[[int, int, int], float]) -> None:
        self.name = name
        self._fn = fn

    def __call__(self, step: int, steps_per_epoch: int, total_steps: int) -> float:
        value = self._fn(step, steps_per_epoch, total_steps)
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ConfigError(
                f"beta schedule {self.name!r} returned {value!r} at step {step}; it must return "
                "a finite number > 0"
            )
        if value <= 0:
            raise ConfigError(
                f"beta schedule {self.name!r} returned {value!r} at step {step}; it must be > 0 "
                "(a weight of a Pyro site; use a small positive value such as 1e-4 for 'off')"
            )
        return float(value)


def _options(name: str, args: dict[str, Any], accepted: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ConfigError(
            f"beta schedule {name!r} has no option(s) {unknown}; it accepts {sorted(accepted)}"
        )
    return {**accepted, **args}


def make_beta_schedule(
    name: str | Callable[..., float], args: dict[str, Any] | None, warmup_epochs: float
) -> BetaSchedule:
    """The schedule ``name`` names (see the module docstring) with options ``args``."""
    args = dict(args or {})
    if name == "linear":
        _options(name, args, {})

        def linear(step: int, steps_per_epoch: int, total_steps: int) -> float:
            warmup_steps = warmup_epochs * steps_per_epoch
            return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

        return BetaSchedule("linear", linear)
    if warmup_epochs:
        raise ConfigError(
            f"`warmup_epochs` is the linear schedule's; beta schedule {name!r} sets its own shape "
            "(drop --warmup-epochs)"
        )
    if name == "cyclical":
        opts = _options(name, args, {"cycles": 4, "ratio": 0.5})
        cycles, ratio = opts["cycles"], opts["ratio"]
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise ConfigError(
                f"cyclical beta schedule: `cycles` must be an integer >= 1, got {cycles!r}"
            )
        if isinstance(ratio, bool) or not isinstance(ratio, Real) or not 0 < ratio <= 1:
            raise ConfigError(f"cyclical beta schedule: `ratio` must be in (0, 1], got {ratio!r}")

        def cyclical(step: int, steps_per_epoch: int, total_steps: int) -> float:
            period = max(1, math.ceil(total_steps / cycles))
            tau = (step % period + 1) / period  # > 0: Pyro scales a site by a positive weight
            return min(1.0, tau / ratio)

        return BetaSchedule("cyclical", cyclical)
    fn = name if callable(name) else _user_function(name)
    try:
        inspect.signature(fn).bind(0, 1, **args)
    except TypeError as e:
        raise ConfigError(
            f"beta schedule {getattr(fn, '__name__', fn)!r} must be callable as "
            f"function(step, total_steps, **options) with options {sorted(args)}: {e}"
        ) from None
    label = name if isinstance(name, str) else getattr(fn, "__name__", "function")

    def user(step: int, steps_per_epoch: int, total_steps: int) -> float:
        return fn(step, total_steps, **args)

    return BetaSchedule(label, user)


def _user_function(spec: str) -> Callable[..., float]:
    from ..components import resolve_function

    if ":" not in spec:
        raise ConfigError(
            f"Unknown beta schedule {spec!r}; expected one of {list(BUILT_IN)}, "
            "'file.py:function' or 'package.module:function'"
        )
    return resolve_function(spec, "beta schedule")
