r"""Variational families: how an encoder's raw output becomes :math:`q(z \mid x)`.

A family declares its parameters as an ordered mapping ``name -> constraint``. An encoder
emits one block of ``latent_dim`` raw numbers per parameter; each block is mapped onto the
parameter's support with :func:`torch.distributions.biject_to` and handed to :meth:`build`.

By default a prior's guide *mirrors* the prior: :class:`MirrorFamily` reads the constraints off
the prior distribution's own ``arg_constraints``, so a new prior needs no guide code.

A family is a :class:`torch.nn.Module` so that it follows ``.train()`` / ``.eval()`` and
``.to(device)`` with the encoder that owns it (a relaxed family samples exactly in eval mode).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from numbers import Real

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import Transform, biject_to, constraints
from torch.distributions.transforms import AffineTransform, ComposeTransform

from ..errors import ConfigError

#: Raw encoder outputs are clamped to this range before the bijection, so that a bad batch
#: cannot turn ``exp`` of a large number into ``inf`` (the clamp is far outside anything a
#: trained network produces: exp(15) ~ 3.3e6).
RAW_CLAMP = 15.0

# Of two alternative parameterisations, the encoder emits the first one listed.
_PREFERRED_OVER = {
    "probs": "logits",
    "covariance_matrix": "scale_tril",
    "precision_matrix": "scale_tril",
}


def check_temperatures(initial_temperature: float, final_temperature: float) -> None:
    """Validate an annealing schedule: finite temperatures with ``0 < final <= initial``."""
    for name, value in (
        ("initial_temperature", initial_temperature),
        ("final_temperature", final_temperature),
    ):
        if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
            raise ConfigError(f"`{name}` must be a positive number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"`{name}` must be finite, got {value!r}")
    if final_temperature > initial_temperature:
        raise ConfigError(
            f"`final_temperature` must be at most `initial_temperature` "
            f"({initial_temperature!r}), got {final_temperature!r}"
        )


def base_distribution(d: dist.Distribution) -> dist.Distribution:
    """Strip ``Independent`` wrappers (``.to_event``) and return the underlying distribution."""
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    return d


def _is_unit_affine(t: Transform) -> bool:
    """``t`` is ``AffineTransform(0, 1)`` with Python numbers: ``0 + 1 * x``, the identity."""
    return (
        isinstance(t, AffineTransform)
        and isinstance(t.loc, Real)
        and isinstance(t.scale, Real)
        and t.loc == 0
        and t.scale == 1
    )


def lean_bijection(c: constraints.Constraint) -> Transform:
    r"""``biject_to(c)`` without its identity steps.

    ``biject_to(positive)`` is ``ComposeTransform([ExpTransform(), AffineTransform(0.0, 1)])``:
    :math:`0 + 1 \cdot e^x`, two more kernels forward and backward per call that change no bit
    (:math:`1 \cdot v = v` and :math:`0 + v = v` exactly for the non-negative :math:`v = e^x`,
    and the gradient is multiplied by 1). The unit affine steps are dropped; a composition of one
    step is that step.
    """
    t = biject_to(c)
    if isinstance(t, ComposeTransform):
        parts = [p for p in t.parts if not _is_unit_affine(p)]
        if len(parts) == 1:
            return parts[0]
        if len(parts) != len(t.parts):
            return ComposeTransform(parts)
    return t


def _constraint_is_usable(c: constraints.Constraint) -> bool:
    try:
        biject_to(c)
    except NotImplementedError:
        return False
    return c.event_dim == 0


class VariationalFamily(nn.Module):
    r"""A family of distributions over :math:`z \in \mathbb{R}^D` (event shape ``(D,)``).

    Subclasses set :attr:`param_constraints` and implement :meth:`build`.

    Attributes:
        param_constraints: ordered ``name -> constraint``; one encoder output block each.
    """

    param_constraints: OrderedDict[str, constraints.Constraint]

    def __init__(self) -> None:
        super().__init__()
        self.param_constraints = OrderedDict()

    @property
    def num_params(self) -> int:
        """How many blocks of ``latent_dim`` raw outputs the encoder head must produce."""
        return len(self.param_constraints)

    def constrain(self, raw: torch.Tensor, latent_dim: int) -> dict[str, torch.Tensor]:
        """Split raw encoder output ``(..., P * D)`` into constrained parameters ``(..., D)``."""
        expected = self.num_params * latent_dim
        if raw.shape[-1] != expected:
            raise ConfigError(
                f"encoder head produced {raw.shape[-1]} outputs but the variational family "
                f"{type(self).__name__} needs {expected} ({self.num_params} x latent_dim={latent_dim})"
            )
        blocks = raw.clamp(-RAW_CLAMP, RAW_CLAMP).split(latent_dim, dim=-1)
        return {name: t(block) for (name, t), block in zip(self._bijections(), blocks, strict=True)}

    def _bijections(self) -> list[tuple[str, Transform]]:
        """``(name, biject_to(constraint))`` per parameter (:func:`lean_bijection`), built once per
        set of constraints."""
        key = tuple(self.param_constraints.items())
        cached = self.__dict__.get("_bijection_cache")
        if cached is None or cached[0] != key:
            cached = (key, [(name, lean_bijection(c)) for name, c in key])
            self.__dict__["_bijection_cache"] = cached
        return cached[1]

    def build(self, **params: torch.Tensor) -> dist.Distribution:
        """Return q(z | x) with batch shape ``params[...].shape[:-1]`` and event shape ``(D,)``."""
        raise NotImplementedError

    def anneal(self, progress: float) -> None:
        """Optional hook called by the trainer with training progress in [0, 1]."""


class MirrorFamily(VariationalFamily):
    r"""q(z|x) of the same type as the prior, parameters from ``dist_cls.arg_constraints``.

    Args:
        dist_cls: a univariate distribution class (e.g. ``dist.Normal``, ``dist.Laplace``); the
            guide is ``dist_cls(**params).to_event(1)``.
        exclude: parameter names not to learn (e.g. ``("df",)`` for Student-t); they take
            the values in ``fixed``.
        fixed: constant keyword arguments passed to ``dist_cls``.
    """

    def __init__(
        self,
        dist_cls: type[dist.Distribution],
        exclude: tuple[str, ...] = (),
        fixed: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.dist_cls = dist_cls
        self.fixed = dict(fixed or {})
        arg_constraints = dict(getattr(dist_cls, "arg_constraints", {}))
        for alt, preferred in _PREFERRED_OVER.items():
            if alt in arg_constraints and preferred in arg_constraints:
                del arg_constraints[alt]
        for name, c in arg_constraints.items():
            if name in exclude or name in self.fixed:
                continue
            if not _constraint_is_usable(c):
                raise ConfigError(
                    f"cannot mirror {dist_cls.__name__}: parameter `{name}` has constraint {c} "
                    "with no elementwise bijection; give the prior its own guide_family()"
                )
            self.param_constraints[name] = c
        if not self.param_constraints:
            raise ConfigError(f"cannot mirror {dist_cls.__name__}: it declares no arg_constraints")

    def build(self, **params: torch.Tensor) -> dist.Distribution:
        kwargs: dict[str, torch.Tensor | float] = dict(self.fixed)
        kwargs.update(params)
        return self.dist_cls(**kwargs).to_event(1)

    def extra_repr(self) -> str:
        return f"{self.dist_cls.__name__}({', '.join(self.param_constraints)})"


def _elementwise(support: constraints.Constraint) -> constraints.Constraint:
    """``support`` without its ``independent`` (and mixture) wrappers: the per-coordinate
    constraint."""
    wrappers = tuple(
        c
        for c in (
            constraints.independent,
            getattr(constraints, "MixtureSameFamilyConstraint", None),
        )
        if isinstance(c, type)
    )
    while isinstance(support, wrappers):
        support = support.base_constraint
    return support


class NormalOnSupport(VariationalFamily):
    r"""A diagonal Normal pushed onto a support: :math:`z = T(u)`, :math:`u \sim \mathcal{N}(\mu,
    \sigma^2)`, with :math:`T` = ``biject_to(support)`` (the identity on the real line).

    The family for a prior with no parameters to mirror (a mixture, a flow): on the real line it
    is the engine's :class:`~ppl_vae.models.distributions.normal.Normal`; on the positive half
    line a log-normal; on an interval a logit-normal.
    """

    def __init__(self, support: constraints.Constraint = constraints.real) -> None:
        super().__init__()
        self.support = _elementwise(support)
        self.param_constraints["loc"] = constraints.real
        self.param_constraints["scale"] = constraints.positive
        self._real = type(self.support) is type(constraints.real)
        if not self._real:
            if not _constraint_is_usable(self.support):
                raise ConfigError(f"no elementwise bijection onto the support {self.support}")
            self._transform = lean_bijection(self.support)

    def build(self, **params: torch.Tensor) -> dist.Distribution:
        from .normal import Normal

        base = Normal(params["loc"], params["scale"])
        if self._real:
            return base.to_event(1)
        return dist.TransformedDistribution(base, [self._transform]).to_event(1)

    def extra_repr(self) -> str:
        return "Normal(loc, scale)" + ("" if self._real else f" on {self.support}")


def family_for(d: dist.Distribution, owner: str) -> VariationalFamily:
    """The default q(z|x) family for a prior distribution ``d``: its own type where its
    ``arg_constraints`` can be mirrored, else a Normal on its support (:class:`NormalOnSupport`).

    Raises:
        ConfigError: neither works (a support with no elementwise bijection), naming what to
            write.
    """
    base = base_distribution(d)
    try:
        return MirrorFamily(type(base))
    except ConfigError as mirror_error:
        try:
            return NormalOnSupport(d.support)
        except (ConfigError, NotImplementedError) as e:
            raise ConfigError(
                f"prior {owner} returns a {type(base).__name__}, which cannot be mirrored "
                f"({mirror_error}) and whose support {_elementwise(d.support)} has no elementwise "
                f"bijection ({e}); give {owner} a guide_family() returning a VariationalFamily, "
                "e.g. MirrorFamily(dist.Normal)"
            ) from None
