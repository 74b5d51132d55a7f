r"""Spike-and-slab distributions, their relaxed (reparameterised) form and analytic KLs.

Per dimension, the spike-and-slab distribution (Mitchell & Beauchamp 1988) is a mixture of a
point mass at zero and a Normal slab,

.. math:: p(z) = (1 - \gamma)\, \delta_0(z) + \gamma\, \mathcal{N}(z;\, \mu, \sigma^2).

It has no density with respect to Lebesgue measure, so densities are taken with respect to the
*mixed* base measure :math:`\delta_0 + \lambda` (a unit point mass at zero plus Lebesgue measure):
:math:`\log p(0) = \log(1 - \gamma)` and
:math:`\log p(z) = \log\gamma + \log\mathcal{N}(z;\mu,\sigma^2)` for :math:`z \neq 0`. Prior
and guide share that base measure, so :math:`\log p(z) - \log q(z)` is a log Radon-Nikodym
derivative and importance weights computed from exact samples are correct.

Training uses :class:`RelaxedSpikeAndSlab` (Variational Sparse Coding, Tonolini et al. 2020): the
binary gate is replaced by a binary concrete variable (Maddison et al. 2017; Jang et al. 2017)

.. math:: g = \operatorname{sigmoid}\big((\operatorname{logit}\gamma + L) / T\big),\quad
    L \sim \operatorname{Logistic}(0, 1),\quad s = \mu + \sigma\varepsilon,\quad z = g\, s,

which is a differentiable function of :math:`(\gamma, \mu, \sigma)`, so ``Trace_ELBO`` uses
pathwise gradients (``has_rsample = True``; no score-function term). As :math:`T \to 0`,
:math:`g \to b = \mathbb{1}[\operatorname{logit}\gamma + L > 0]
\sim \operatorname{Bernoulli}(\gamma)` and :math:`z \to b\, s`, an exact spike-and-slab sample.

**The relaxed log-density (design choice).** ``Trace_ELBO`` evaluates the prior's and the guide's
``log_prob`` at the guide's sample. A relaxed :math:`z = g s` is never exactly zero, so the exact
mixed-measure densities at :math:`z` would score every code as a slab value and the gate would get
no KL gradient at all. The density of the product :math:`g s` itself has no closed form. Instead,
:meth:`RelaxedSpikeAndSlab.rsample` attaches its gate and slab draws :math:`(g, s)` to the returned
tensor (attribute ``_spike_and_slab_parts``, the same mechanism Pyro's
``RelaxedBernoulliStraightThrough`` uses with ``_unquantize``). When a value carries them, *both*
:class:`SpikeAndSlab` (the prior) and :class:`RelaxedSpikeAndSlab` (the guide) evaluate the
exact mixed-measure log-density of the hard sample :math:`z = b s`, with the indicator :math:`b`
replaced by its relaxation :math:`g`:

.. math:: \tilde\ell(g, s) = g\,\big[\log\gamma + \log\mathcal{N}(s;\mu,\sigma^2)\big]
    + (1 - g)\log(1 - \gamma).

Properties (checked in ``tests/models/test_spike_and_slab.py``):

* As :math:`T \to 0`, :math:`\tilde\ell \to` the exact log-density of the hard sample, and the
  decoder's input :math:`g s \to b s`: the relaxed ``Trace_ELBO`` loss converges to the exact ELBO.
  The decoder's input is biased by :math:`O(T)`:
  :math:`\mathbb{E}[g(1-g)] \approx T\gamma(1-\gamma)`.
* Because :math:`g` and :math:`s` are independent, the expected KL term is exactly the analytic KL
  with the mixture weight :math:`\gamma` replaced by :math:`\bar g_T = \mathbb{E}[g]`:
  :math:`\mathbb{E}[\tilde\ell_q - \tilde\ell_p] = \bar g_T\,[\log\frac{\gamma}{\alpha}
  + \mathrm{KL}(\mathcal{N}(\mu,\sigma)\,\|\,\mathcal{N}(m,s))]
  + (1 - \bar g_T)\log\frac{1-\gamma}{1-\alpha}`, so its **bias** is
  :math:`(\bar g_T - \gamma)\,\partial\mathrm{KL}/\partial\gamma`, with
  :math:`\bar g_T - \gamma \approx \tfrac{\pi^2}{6} T^2 \gamma(1-\gamma)(1 - 2\gamma)` (pulled
  towards 1/2; by quadrature :math:`|\bar g_T - \gamma| < 1.6\times 10^{-3}` for every
  :math:`\gamma` at :math:`T = 0.1`): :math:`O(T^2)`, zero at :math:`\gamma = 1/2`, of either
  sign. So for :math:`T > 0` the relaxed objective is not a strict lower bound; the exact bound is
  the one computed in eval mode.
* Its pathwise gradients converge to the gradients of the analytic KL: for ``loc`` / ``scale`` the
  expected gradient is :math:`\bar g_T\, \nabla\mathrm{KL}_\mathcal{N}`; for the gate,
  :math:`\mathbb{E}[\partial g / \partial \operatorname{logit}\gamma] \to \gamma(1-\gamma)` (the
  relaxation's derivative concentrates on the threshold), which times the bracket above gives
  :math:`\partial \mathrm{KL} / \partial \operatorname{logit}\gamma`. Its variance grows like
  :math:`1/T`, the usual concrete trade-off (see :class:`SpikeAndSlabFamily` for the schedule).

:class:`SpikeAndSlab` scores a value without attached parts (an exact sample, or any tensor a
user passes) by the exact mixed-measure density, the :math:`T \to 0` limit.
:class:`RelaxedSpikeAndSlab` refuses one with a :class:`ConfigError`: its density is defined only
at its own draws, and a copy of a draw (``z.detach()``, ``z.view_as(z)``, ``z.clone()``, as the
sticking-the-landing and DReG estimators make) has lost :math:`(g, s)`; scoring it silently by the
exact density would mix two different objectives. Such estimators do not apply to this family
(``trace``, ``meanfield``, ``tracegraph``, Renyi/IWAE on the original draws do).

``TraceMeanField_ELBO`` does not use :math:`\tilde\ell`: the KLs registered here give the exact
analytic KL

.. math:: \mathrm{KL}(q\,\|\,p)
    = \gamma\,\mathrm{KL}(\mathcal{N}(\mu,\sigma^2)\,\|\,\mathcal{N}(m,s^2))
    + \mathrm{KL}(\operatorname{Bern}(\gamma)\,\|\,\operatorname{Bern}(\alpha)).

References:
    T. J. Mitchell and J. J. Beauchamp, "Bayesian variable selection in linear regression",
    JASA 1988.
    F. Tonolini, B. S. Jensen and R. Murray-Smith, "Variational Sparse Coding", UAI 2020.
    C. J. Maddison, A. Mnih and Y. W. Teh, "The Concrete Distribution", ICLR 2017.
    E. Jang, S. Gu and B. Poole, "Categorical Reparameterization with Gumbel-Softmax", ICLR 2017.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from numbers import Number
from typing import ClassVar

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.kl import register_kl
from torch.distributions.utils import (
    broadcast_all,
    clamp_probs,
    lazy_property,
    logits_to_probs,
    probs_to_logits,
)

from ..errors import ConfigError
from .family import VariationalFamily, check_temperatures

__all__ = [
    "RelaxedSpikeAndSlab",
    "SpikeAndSlab",
    "SpikeAndSlabFamily",
    "kl_spike_and_slab",
]

#: Name of the tensor attribute on which :meth:`RelaxedSpikeAndSlab.rsample` stores ``(g, s)``.
PARTS_ATTR = "_spike_and_slab_parts"

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _OpenUnitInterval(constraints.Constraint):
    """The open interval (0, 1) (torch ships only the closed ``unit_interval``)."""

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return (value > 0) & (value < 1)

    def __repr__(self) -> str:
        return "OpenInterval(lower_bound=0.0, upper_bound=1.0)"


open_unit_interval = _OpenUnitInterval()


def _normal_log_prob(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - loc) / scale) ** 2 - scale.log() - _HALF_LOG_2PI


def _mixed_log_density(
    value: torch.Tensor, gate_logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    r"""Log-density w.r.t. :math:`\delta_0 + \lambda`; relaxed if ``value`` carries ``(g, s)``."""
    log_on = F.logsigmoid(gate_logits)
    log_off = F.logsigmoid(-gate_logits)
    parts = getattr(value, PARTS_ATTR, None)
    if parts is not None:
        gate, slab = parts
        return gate * (log_on + _normal_log_prob(slab, loc, scale)) + (1 - gate) * log_off
    slab_lp = _normal_log_prob(value, loc, scale)
    return torch.where(value == 0, log_off, log_on + slab_lp)


def _logistic_noise(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    u = clamp_probs(torch.rand(shape, dtype=like.dtype, device=like.device))
    return u.log() - (-u).log1p()


class _SpikeAndSlabBase(TorchDistribution):
    """Shared parameter handling: gate (probs or logits), slab ``loc`` and ``scale``."""

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "gate_probs": open_unit_interval,
        "gate_logits": constraints.real,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = constraints.real
    #: Values are exactly 0 with probability :math:`1 - \gamma` (the latent figures report the
    #: share of exact-zero codes).
    exact_zeros: ClassVar[bool] = True
    #: The name of :meth:`traversal_values`' grid in the latent figures.
    traversal_grid: ClassVar[str] = "spike_and_slab"
    traversal_description: ClassVar[str] = (
        "the spike-and-slab prior's exact quantiles (exactly 0 in the spike)"
    )

    def _init_params(
        self,
        gate_probs: torch.Tensor | float | None,
        gate_logits: torch.Tensor | float | None,
        loc: torch.Tensor | float,
        scale: torch.Tensor | float,
    ) -> torch.Size:
        if (gate_probs is None) == (gate_logits is None):
            raise ConfigError(
                f"{type(self).__name__} takes exactly one of `gate_probs` or `gate_logits`, got "
                f"gate_probs={gate_probs!r}, gate_logits={gate_logits!r}"
            )
        if gate_probs is not None:
            self.gate_probs, self.loc, self.scale = broadcast_all(gate_probs, loc, scale)
        else:
            self.gate_logits, self.loc, self.scale = broadcast_all(gate_logits, loc, scale)
        return self.loc.shape

    @lazy_property
    def gate_probs(self) -> torch.Tensor:
        r"""Gate probability :math:`\gamma` (probability of a nonzero value)."""
        return logits_to_probs(self.gate_logits, is_binary=True)

    @lazy_property
    def gate_logits(self) -> torch.Tensor:
        r""":math:`\operatorname{logit}\gamma`."""
        return probs_to_logits(self.gate_probs, is_binary=True)

    def _expand_params(self, new: _SpikeAndSlabBase, batch_shape: torch.Size) -> None:
        if "gate_probs" in self.__dict__:
            new.gate_probs = self.gate_probs.expand(batch_shape)
        if "gate_logits" in self.__dict__:
            new.gate_logits = self.gate_logits.expand(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Log-density w.r.t. :math:`\delta_0 + \lambda` (relaxed at a relaxed sample).

        .. math:: \log p(z) = \mathbb{1}[z = 0]\log(1-\gamma)
            + \mathbb{1}[z \neq 0]\,\big[\log\gamma + \log\mathcal{N}(z;\mu,\sigma^2)\big]

        If ``value`` came from :meth:`RelaxedSpikeAndSlab.rsample` it carries its gate and slab
        draws :math:`(g, s)` and the relaxed :math:`\tilde\ell(g, s)` of the module docstring is
        returned instead.
        """
        if self._validate_args:
            self._validate_sample(value)
        return _mixed_log_density(value, self.gate_logits, self.loc, self.scale)

    # -- what the latent figures show ----------------------------------------------------------
    def traversal_values(self, quantiles: torch.Tensor) -> torch.Tensor:
        r"""A latent traversal's values: the exact quantiles ``(Q, *batch_shape)`` of the
        mixture at ``quantiles`` ``(Q,)``,

        .. math:: F^{-1}(q) = 0 \text{ for } q \in [a, a + 1 - \gamma], \quad
            a = \gamma\,\Phi(-\mu/\sigma) \text{ (the slab's mass below 0)},

        else the slab's :math:`\mu + \sigma\,\Phi^{-1}(q/\gamma)` below and
        :math:`\mu + \sigma\,\Phi^{-1}((q - 1 + \gamma)/\gamma)` above (float64; the spike's
        boundaries widened by 1e-6 for float32 rounding of the parameters). Exact zeros, not
        small numbers.
        """
        g, mu, sd = (
            t.detach().double()
            for t in torch.broadcast_tensors(self.gate_probs, self.loc, self.scale)
        )
        q = quantiles.to(mu).reshape(-1, *([1] * mu.dim()))
        below = g * torch.special.ndtr(-mu / sd)
        lo = mu + sd * torch.special.ndtri((q / g).clamp(0.0, 1.0))
        hi = mu + sd * torch.special.ndtri(((q - (1 - g)) / g).clamp(0.0, 1.0))
        spike = (q >= below - 1e-6) & (q <= below + 1 - g + 1e-6)
        out = torch.where(spike, torch.zeros_like(lo), torch.where(q < below, lo, hi))
        return out.to(self.loc.dtype)

    def histogram_parts(self) -> tuple[str, torch.Tensor, str, torch.Tensor]:
        """What the posterior histograms show: the slab's location and scale."""
        return "slab location", self.loc, "slab scale", self.scale


class SpikeAndSlab(_SpikeAndSlabBase):
    r"""Exact spike-and-slab: a point mass at 0 and a Normal slab, one per batch element.

    .. math:: p(z) = (1 - \gamma)\,\delta_0(z) + \gamma\,\mathcal{N}(z;\, \mu, \sigma^2)

    Batch-shaped with event shape ``()``; priors and guides wrap it with ``.to_event(1)``.
    Samples contain exact zeros with probability :math:`1 - \gamma`; sampling is not
    reparameterisable (``has_rsample = False``). Densities are w.r.t. :math:`\delta_0 + \lambda`.

    Args:
        gate_probs: :math:`\gamma \in (0, 1)`, probability that the value comes from the slab.
        gate_logits: :math:`\operatorname{logit}\gamma` (give this or ``gate_probs``).
        loc: slab location :math:`\mu`.
        scale: slab scale :math:`\sigma > 0`.
        validate_args: check the arguments (Pyro's validation setting when ``None``).

    Example:
        >>> d = SpikeAndSlab(gate_probs=torch.tensor([0.3, 0.9]), loc=0.0, scale=1.0)
        >>> d.sample((1000,)).eq(0).float().mean(0)  # doctest: +SKIP
        tensor([0.7010, 0.0980])
    """

    has_rsample = False

    def __init__(
        self,
        gate_probs: torch.Tensor | float | None = None,
        gate_logits: torch.Tensor | float | None = None,
        loc: torch.Tensor | float = 0.0,
        scale: torch.Tensor | float = 1.0,
        validate_args: bool | None = None,
    ) -> None:
        batch_shape = self._init_params(gate_probs, gate_logits, loc, scale)
        super().__init__(batch_shape, torch.Size(), validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: SpikeAndSlab | None = None
    ) -> SpikeAndSlab:
        new = self._get_checked_instance(SpikeAndSlab, _instance)
        batch_shape = torch.Size(batch_shape)
        self._expand_params(new, batch_shape)
        super(SpikeAndSlab, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        r"""Exact draws :math:`z = b\,s`, :math:`b \sim \operatorname{Bern}(\gamma)` (exact 0s)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            on = self.gate_logits.expand(shape) + _logistic_noise(shape, self.loc) > 0
            slab = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device
            )
            return torch.where(on, slab, torch.zeros_like(slab))

    @property
    def mean(self) -> torch.Tensor:
        r""":math:`\gamma\mu`."""
        return self.gate_probs * self.loc

    @property
    def variance(self) -> torch.Tensor:
        r""":math:`\gamma(\sigma^2 + \mu^2) - \gamma^2\mu^2`."""
        g = self.gate_probs
        return g * (self.scale**2 + self.loc**2) - (g * self.loc) ** 2


class RelaxedSpikeAndSlab(_SpikeAndSlabBase):
    r"""Spike-and-slab with a binary concrete gate at temperature :math:`T` (reparameterised).

    .. math:: z = g\,s,\quad g = \operatorname{sigmoid}\big((\operatorname{logit}\gamma + L)/T\big),
        \quad L \sim \operatorname{Logistic}(0,1),\quad s \sim \mathcal{N}(\mu, \sigma^2)

    ``g`` is a ``RelaxedBernoulli(T, probs=gamma)`` draw (written out so that the same logistic
    noise gives the exact gate :math:`\mathbb{1}[\operatorname{logit}\gamma + L > 0]` as
    :math:`T \to 0`). :meth:`rsample` attaches ``(g, s)`` to the sample; :meth:`log_prob` is the
    relaxed log-density :math:`\tilde\ell(g, s)` described in the module docstring (the exact
    mixed-measure density at a value without attached parts).

    Args:
        temperature: :math:`T > 0`.
        gate_probs: :math:`\gamma \in (0, 1)`.
        gate_logits: :math:`\operatorname{logit}\gamma` (give this or ``gate_probs``).
        loc: slab location :math:`\mu`.
        scale: slab scale :math:`\sigma > 0`.
        validate_args: check the arguments (Pyro's validation setting when ``None``).
    """

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        **_SpikeAndSlabBase.arg_constraints,
        "temperature": constraints.positive,
    }
    has_rsample = True

    def __init__(
        self,
        temperature: torch.Tensor | float,
        gate_probs: torch.Tensor | float | None = None,
        gate_logits: torch.Tensor | float | None = None,
        loc: torch.Tensor | float = 0.0,
        scale: torch.Tensor | float = 1.0,
        validate_args: bool | None = None,
    ) -> None:
        batch_shape = self._init_params(gate_probs, gate_logits, loc, scale)
        if isinstance(temperature, Number):
            temperature = self.loc.new_tensor(float(temperature))
        # A copy: the family's temperature buffer may be annealed in place before backward().
        self.temperature = temperature.detach().to(
            dtype=self.loc.dtype, device=self.loc.device, copy=True
        )
        super().__init__(batch_shape, torch.Size(), validate_args=validate_args)

    def expand(
        self,
        batch_shape: torch.Size | tuple[int, ...],
        _instance: RelaxedSpikeAndSlab | None = None,
    ) -> RelaxedSpikeAndSlab:
        new = self._get_checked_instance(RelaxedSpikeAndSlab, _instance)
        batch_shape = torch.Size(batch_shape)
        self._expand_params(new, batch_shape)
        new.temperature = self.temperature
        super(RelaxedSpikeAndSlab, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        r"""Pathwise draw :math:`z = g s`; ``z._spike_and_slab_parts = (g, s)``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        noise = _logistic_noise(shape, self.loc)
        gate = torch.sigmoid((self.gate_logits + noise) / self.temperature)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        slab = self.loc + self.scale * eps
        z = gate * slab
        setattr(z, PARTS_ATTR, (gate, slab))
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r"""Relaxed log-density :math:`\tilde\ell(g, s)` at a draw of :meth:`rsample`.

        .. math:: \tilde\ell(g, s) = g\,[\log\gamma + \log\mathcal{N}(s;\mu,\sigma^2)]
            + (1 - g)\log(1 - \gamma)

        Raises:
            ConfigError: ``value`` does not carry its gate and slab draws (it is not a draw of
                :meth:`rsample`, or a copy of one); use :meth:`exact` to score exact values.
        """
        if getattr(value, PARTS_ATTR, None) is None:
            raise ConfigError(
                f"{type(self).__name__}.log_prob is defined only at its own rsample() draws, which "
                f"carry the relaxed gate and slab (attribute `{PARTS_ATTR}`); got a tensor of "
                f"shape {tuple(value.shape)} without them (a detached or copied draw, as the "
                "sticking-the-landing and DReG estimators make?). Use the 'trace' or 'meanfield' "
                "estimator with this guide, or .exact().log_prob(value) for exact values"
            )
        return super().log_prob(value)

    def exact(self) -> SpikeAndSlab:
        r"""The :math:`T \to 0` limit: a :class:`SpikeAndSlab` with the same parameters."""
        return SpikeAndSlab(
            gate_logits=self.gate_logits,
            loc=self.loc,
            scale=self.scale,
            validate_args=self._validate_args,
        )


# -- analytic KL ---------------------------------------------------------------------------------
def kl_spike_and_slab(q: _SpikeAndSlabBase, p: SpikeAndSlab) -> torch.Tensor:
    r"""Elementwise :math:`\mathrm{KL}(q\,\|\,p)` of spike-and-slabs (w.r.t. the mixed measure).

    .. math:: \gamma\,\mathrm{KL}(\mathcal{N}(\mu,\sigma^2)\,\|\,\mathcal{N}(m,s^2))
        + \gamma\log\frac{\gamma}{\alpha} + (1-\gamma)\log\frac{1-\gamma}{1-\alpha}

    A relaxed ``q`` is scored by its exact (:math:`T \to 0`) counterpart.
    """
    gate = q.gate_probs
    log_on_q, log_off_q = F.logsigmoid(q.gate_logits), F.logsigmoid(-q.gate_logits)
    log_on_p, log_off_p = F.logsigmoid(p.gate_logits), F.logsigmoid(-p.gate_logits)
    kl_bern = gate * (log_on_q - log_on_p) + (1 - gate) * (log_off_q - log_off_p)
    var_ratio = (q.scale / p.scale) ** 2
    kl_normal = 0.5 * (var_ratio + ((q.loc - p.loc) / p.scale) ** 2 - 1 - var_ratio.log())
    return gate * kl_normal + kl_bern


@register_kl(SpikeAndSlab, SpikeAndSlab)
def _kl_spike_and_slab_spike_and_slab(q: SpikeAndSlab, p: SpikeAndSlab) -> torch.Tensor:
    return kl_spike_and_slab(q, p)


@register_kl(RelaxedSpikeAndSlab, SpikeAndSlab)
def _kl_relaxed_spike_and_slab_spike_and_slab(
    q: RelaxedSpikeAndSlab, p: SpikeAndSlab
) -> torch.Tensor:
    return kl_spike_and_slab(q, p)


# -- the variational family ----------------------------------------------------------------------
class SpikeAndSlabFamily(VariationalFamily):
    r"""q(z|x): spike-and-slab per dimension; relaxed gate in training, exact in eval mode.

    .. math:: q(z_d \mid x) = (1 - \gamma_d)\,\delta_0 + \gamma_d\,\mathcal{N}(\mu_d, \sigma_d^2)

    The encoder emits ``gate_logits`` (real), ``loc`` (real) and ``scale`` (positive).
    :meth:`build` returns ``RelaxedSpikeAndSlab(T, ...).to_event(1)`` in training mode and
    ``SpikeAndSlab(...).to_event(1)`` in eval mode (exact zeros). The temperature is a buffer (it
    follows ``.to(device)`` and is saved in checkpoints) and :meth:`anneal` lowers it geometrically,

    .. math:: T(p) = T_0\,(T_1 / T_0)^{p}, \quad p \in [0, 1].

    Defaults :math:`T_0 = 1`, :math:`T_1 = 0.1`. At :math:`T = 1` the concrete gate is smooth and
    gradients have low variance while the encoder is far from good; at :math:`T = 0.1` the
    relaxation's bias on the KL term is :math:`O(T^2)` (:math:`|\mathbb{E}[g] - \gamma| < 0.002`
    for every :math:`\gamma`, by quadrature) and 85% of gates at :math:`\gamma = 1/2` (more
    elsewhere) lie within 0.05 of 0 or 1, so the decoder is trained on nearly the codes it sees in
    eval mode, while the second moment of :math:`\partial g/\partial\operatorname{logit}\gamma`
    (growing like :math:`1/T`) is about 13 times that at :math:`T = 1`. A lower :math:`T_1` trades
    gradient variance for less train/eval mismatch (the decoder's input is biased by
    :math:`O(T)`: :math:`\mathbb{E}[g(1-g)] \approx T\gamma(1-\gamma)`).

    Args:
        initial_temperature: :math:`T_0 > 0`.
        final_temperature: :math:`T_1`, with :math:`0 < T_1 \le T_0`.
    """

    def __init__(self, initial_temperature: float = 1.0, final_temperature: float = 0.1) -> None:
        super().__init__()
        check_temperatures(initial_temperature, final_temperature)
        self.initial_temperature = float(initial_temperature)
        self.final_temperature = float(final_temperature)
        self.param_constraints = OrderedDict(
            gate_logits=constraints.real, loc=constraints.real, scale=constraints.positive
        )
        self.register_buffer("temperature", torch.tensor(self.initial_temperature))

    def anneal(self, progress: float) -> None:
        r"""Set :math:`T = T_0 (T_1/T_0)^{p}` with ``progress`` :math:`p` clamped to [0, 1]."""
        if not math.isfinite(progress):
            raise ConfigError(f"`progress` must be a finite number in [0, 1], got {progress!r}")
        p = min(max(float(progress), 0.0), 1.0)
        t = self.initial_temperature * (self.final_temperature / self.initial_temperature) ** p
        self.temperature.fill_(t)

    def build(  # type: ignore[override]
        self, gate_logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
    ) -> dist.Distribution:
        if self.training:
            return RelaxedSpikeAndSlab(
                self.temperature, gate_logits=gate_logits, loc=loc, scale=scale
            ).to_event(1)
        return SpikeAndSlab(gate_logits=gate_logits, loc=loc, scale=scale).to_event(1)

    def extra_repr(self) -> str:
        # the schedule, not the current temperature: the printout is the architecture a
        # checkpoint records, and the temperature is training state
        return (
            f"SpikeAndSlab(gate_logits, loc, scale), temperature {self.initial_temperature:g} "
            f"-> {self.final_temperature:g}"
        )
