r"""ELBO estimators by name, and the importance-sampled log-likelihood used for evaluation.

A *spec* is a name with an optional argument after a colon: ``"trace"``, ``"renyi:0.5"``,
``"iwae:5"``, ``"dreg:5"``. :func:`make_elbo` turns a spec into a Pyro :class:`~pyro.infer.ELBO`.

The contract every estimator returned by :func:`make_elbo` keeps (the training loop relies on it):

``elbo.differentiable_loss(model, guide, *args, **kwargs) -> torch.Tensor``
    Its **value** is the estimator's negative bound (the loss to report) and its **gradient**
    is the estimator's gradient, written with Pyro's convention
    ``loss + (surrogate - surrogate.detach())`` where the two differ.

``loss_and_grads`` is not used by the engine: under ``pyro.settings.set(module_local_params=True)``
no ``"param"`` site reaches the trace, and Pyro's ``Trace_ELBO``, ``TraceMeanField_ELBO`` and
``RenyiELBO`` then skip ``backward`` silently. The classes defined here call ``backward``
whenever the loss requires a gradient.

=============  ==============================================================================
name           estimator
=============  ==============================================================================
``trace``      :class:`pyro.infer.Trace_ELBO`
``meanfield``  :class:`pyro.infer.TraceMeanField_ELBO` (analytic KL where registered)
``tracegraph`` :class:`DifferentiableTraceGraph_ELBO` (Rao-Blackwellised score terms, baselines)
``enum``       :class:`pyro.infer.TraceEnum_ELBO` (exact sums over enumerated sites)
``renyi:A``    :class:`DifferentiableRenyi_ELBO`, order :math:`\alpha` = A (default 0.5, not 1),
               ``num_particles`` particles (5 when 1 is asked for: one particle gives the ELBO)
``iwae:K``     :class:`IWAE_ELBO`: the importance-weighted bound with K particles
``stl``        :class:`TraceSTL_ELBO`: "sticking the landing" (Roeder et al. 2017)
``dreg:K``     :class:`TraceDReG_ELBO`: doubly reparameterised IWAE gradients (Tucker et al. 2019)
=============  ==============================================================================

**How STL and DReG stop the gradient through q's parameters, for any guide.** Both need
:math:`\log q(z;\,\bar\phi)`: the guide density at the reparameterised sample :math:`z(\phi)`
with the variational parameters :math:`\phi` held constant. Detaching "the parameters" of an
arbitrary guide is not possible from outside (they may live in ``nn.Linear`` layers, in the
parameter store, or be computed from earlier latents), so the estimators use the identity

.. math::
    \nabla_\phi \log q(z(\phi);\, \bar\phi)
    = \nabla_\phi \log q(z(\phi);\, \phi) - \nabla_\phi \log q(\bar z;\, \phi),
    \quad \bar z = \mathrm{stop\_gradient}(z),

whose last term, the score function, needs only *values* to be stopped. It is computed by
re-running the guide under ``poutine.replay`` of a trace whose sample values are detached, so
a hierarchical guide :math:`q(z_2 \mid z_1)` keeps the pathwise dependence of its parameters on
:math:`z_1` (a naive "detach every distribution parameter" would lose it and bias the
gradient). When the guide has a single latent site its distribution cannot depend on another
latent, and the re-run is skipped: the site's own ``fn`` is evaluated at :math:`\bar z`.
Every latent site of the guide must be reparameterisable (``fn.has_rsample``); otherwise
:class:`~ppl_vae.ConfigError` is raised.

References:
    Burda, Grosse, Salakhutdinov (2016), Importance weighted autoencoders.
    Li, Turner (2016), Rényi divergence variational inference.
    Roeder, Wu, Duvenaud (2017), Sticking the landing: simple, lower-variance gradient
    estimators for variational inference.
    Tucker, Lawson, Gu, Maddison (2019), Doubly reparameterized gradient estimators for Monte
    Carlo objectives.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import (
    ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
)
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled, torch_item, torch_sum
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan

from ..models.errors import ConfigError

__all__ = [
    "IWAE_ELBO",
    "DifferentiableRenyi_ELBO",
    "DifferentiableTraceGraph_ELBO",
    "TraceDReG_ELBO",
    "TraceSTL_ELBO",
    "estimator_names",
    "log_likelihood",
    "make_elbo",
    "parse_estimator",
]

# Keys under which STL/DReG store extra per-site terms in the guide trace's site dicts.
_SG_LOG_PROB = "_ppl_vae_log_prob_stopped_value"  # log q(stop_gradient(z); phi), scaled, masked
_TILDE_VALUE = "_ppl_vae_gradient_scaled_value"  # DReG: z~, the value the model saw
_TILDE_LOG_PROB = "_ppl_vae_log_prob_gradient_scaled_value"  # DReG: log q(z~; phi)

DEFAULT_RENYI_ALPHA = 0.5
DEFAULT_NUM_IW_PARTICLES = 5


class _BackwardMixin:
    """``loss_and_grads`` that always differentiates, whether or not ``"param"`` sites exist."""

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)  # type: ignore[attr-defined]
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=getattr(self, "retain_graph", None))
        loss = torch_item(loss)
        warn_if_nan(loss, "loss")
        return loss


def _latent_names(trace: poutine.Trace) -> list[str]:
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    ]


def _site_log_prob(site: dict, value: torch.Tensor) -> torch.Tensor:
    """``site["fn"]`` at ``value``, scaled and masked like ``Trace.compute_log_prob``."""
    log_p = site["fn"].log_prob(value, *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"])


def _guide_log_probs_at(
    guide: Callable,
    guide_trace: poutine.Trace,
    values: dict[str, torch.Tensor],
    args: tuple,
    kwargs: dict,
) -> dict[str, torch.Tensor]:
    r"""Per-site :math:`\log q` of every latent site, re-evaluated at ``values``.

    The guide is re-run under ``poutine.replay`` of a copy of ``guide_trace`` whose latent values
    are replaced by ``values``, so every site's distribution is rebuilt from the replaced values
    of the sites before it (and from the guide's parameters, which keep their gradient). The
    re-run is hidden from outer handlers. With a single latent site no re-run is needed.
    """
    names = list(values)
    if len(names) == 1:
        (name,) = names
        return {name: _site_log_prob(guide_trace.nodes[name], values[name])}
    replay_trace = guide_trace.copy()
    for name, value in values.items():
        replay_trace.nodes[name] = {**guide_trace.nodes[name], "value": value}
    with poutine.block():
        rerun = poutine.trace(poutine.replay(guide, trace=replay_trace)).get_trace(*args, **kwargs)
    return {name: _site_log_prob(rerun.nodes[name], rerun.nodes[name]["value"]) for name in names}


def _reparameterised_importance_trace(
    estimator: str,
    max_plate_nesting: float,
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    scale_gradients: bool,
) -> tuple[poutine.Trace, poutine.Trace]:
    """Like ``pyro.infer.enum.get_importance_trace`` ("flat"), plus the STL/DReG terms.

    Stores ``log q(stop_gradient(z); phi)`` under ``_SG_LOG_PROB`` in each latent guide site.
    With ``scale_gradients`` (DReG) the model is replayed against ``z~ = z.view_as(z)``, a
    separate autograd node whose incoming gradient DReG rescales later with a hook, and
    ``log q(z~; phi)`` is stored under ``_TILDE_LOG_PROB``.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    if is_validation_enabled():
        check_if_enumerated(guide_trace)
    latents = [name for name in _latent_names(guide_trace) if not _is_subsample(guide_trace, name)]
    for name in latents:
        site = guide_trace.nodes[name]
        if not getattr(site["fn"], "has_rsample", False) or site["infer"].get("enumerate"):
            why = "is enumerated" if site["infer"].get("enumerate") else "has no rsample"
            raise ConfigError(
                f"estimator '{estimator}' needs reparameterisable guide sites, but site '{name}' "
                f"({type(site['fn']).__name__}) {why}; use 'trace' or 'tracegraph' for "
                "score-function gradients"
            )
    replay_trace = guide_trace
    if scale_gradients:
        replay_trace = guide_trace.copy()
        for name in latents:
            site = guide_trace.nodes[name]
            tilde = site["value"].view_as(site["value"])
            site[_TILDE_VALUE] = tilde
            replay_trace.nodes[name] = {**site, "value": tilde}
    model_trace = poutine.trace(poutine.replay(model, trace=replay_trace)).get_trace(
        *args, **kwargs
    )
    if is_validation_enabled():
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting)

    if latents:
        stopped = {name: guide_trace.nodes[name]["value"].detach() for name in latents}
        for name, log_q in _guide_log_probs_at(guide, guide_trace, stopped, args, kwargs).items():
            guide_trace.nodes[name][_SG_LOG_PROB] = log_q
        if scale_gradients:
            tildes = {name: guide_trace.nodes[name][_TILDE_VALUE] for name in latents}
            for name, log_q in _guide_log_probs_at(
                guide, guide_trace, tildes, args, kwargs
            ).items():
                guide_trace.nodes[name][_TILDE_LOG_PROB] = log_q

    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting)
    return model_trace, guide_trace


def _is_subsample(trace: poutine.Trace, name: str) -> bool:
    return isinstance(trace.nodes[name]["fn"], poutine.subsample_messenger._Subsample)


def _sum_dims_keepdim(tensor: torch.Tensor | float, dims: list[int]) -> torch.Tensor | float:
    """Sum the (negative) ``dims`` that exist in ``tensor``, keeping them as size 1."""
    if not torch.is_tensor(tensor):
        return tensor
    dims = [d for d in dims if -tensor.dim() <= d]
    return tensor.sum(dims, keepdim=True) if dims else tensor


class DifferentiableRenyi_ELBO(_BackwardMixin, RenyiELBO):
    r"""Pyro's :class:`~pyro.infer.RenyiELBO` with ``differentiable_loss``.

    .. math::
        \mathcal{L}_\alpha = \frac{1}{1-\alpha}\,
        \mathbb{E}\Big[\log \frac{1}{K}\sum_{k=1}^K w_k^{1-\alpha}\Big],
        \quad w_k = \frac{p(x, z_k)}{q(z_k \mid x)}, \; z_k \sim q

    The value is :math:`-\mathcal{L}_\alpha` (as :meth:`loss`), the gradient Pyro's
    ``loss_and_grads`` one: :math:`-\sum_k \tilde w_k \nabla \log w_k` with
    :math:`\tilde w_k \propto w_k^{1-\alpha}` normalised over particles (and Pyro's
    :math:`\tfrac{\alpha}{1-\alpha} \log q` surrogate term at non-reparameterised sites).
    At such a site the gradient is the self-normalised estimate of the gradient of the exact
    objective :math:`\tfrac{1}{1-\alpha} \log \mathbb{E}_q[w^{1-\alpha}]`, consistent in K with an
    O(1/K) bias, not an unbiased gradient of the K-particle bound (checked against the closed
    form on a conjugate model in ``tests/test_estimators.py``).
    Log weights are summed over plates not shared by every site, so with a data plate the bound
    is per data point, summed.

    Args:
        alpha: order :math:`\alpha \neq 1`.
        num_particles: K.
        max_plate_nesting: as in :class:`~pyro.infer.ELBO`.
        vectorize_particles: as in :class:`~pyro.infer.ELBO`.
        strict_enumeration_warning: as in :class:`~pyro.infer.ELBO`.
    """

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        elbo_particles = []
        surrogate_particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo_particle: torch.Tensor | float = 0.0
            surrogate_particle: torch.Tensor | float = 0.0
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_prob_sum = torch_sum(site["log_prob"], sum_dims)
                    elbo_particle = elbo_particle + log_prob_sum.detach()
                    surrogate_particle = surrogate_particle + log_prob_sum
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample":
                    _, score_function_term, entropy_term = site["score_parts"]
                    log_prob_sum = torch_sum(site["log_prob"], sum_dims)
                    elbo_particle = elbo_particle - log_prob_sum.detach()
                    if not is_identically_zero(entropy_term):
                        if not is_identically_zero(score_function_term):
                            raise ConfigError(
                                f"renyi/iwae cannot handle site '{name}': it is partially "
                                "reparameterised (pyro issue 1222)"
                            )
                        surrogate_particle = surrogate_particle - log_prob_sum
                    if not is_identically_zero(score_function_term):
                        surrogate_particle = (
                            surrogate_particle + (self.alpha / (1.0 - self.alpha)) * log_prob_sum
                        )
            if not torch.is_tensor(elbo_particle):
                raise ConfigError("the model and guide have no sample sites: nothing to estimate")
            elbo_particles.append(elbo_particle)
            surrogate_particles.append(surrogate_particle)

        if self.vectorize_particles and self.num_particles > 1:
            elbo_stack, surrogate_stack = elbo_particles[0], surrogate_particles[0]
        else:
            elbo_stack = torch.stack(torch.broadcast_tensors(*elbo_particles))
            surrogate_stack = torch.stack(torch.broadcast_tensors(*surrogate_particles))

        log_weights = (1.0 - self.alpha) * elbo_stack
        log_mean_weight = torch.logsumexp(log_weights, dim=0, keepdim=True) - math.log(
            self.num_particles
        )
        elbo = log_mean_weight.sum() / (1.0 - self.alpha)
        normalized_weights = (log_weights - log_mean_weight).exp()
        surrogate_loss = -(normalized_weights * surrogate_stack).sum() / self.num_particles
        loss = -elbo
        warn_if_nan(loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())


class IWAE_ELBO(DifferentiableRenyi_ELBO):
    r"""The importance-weighted bound (Burda et al. 2016): :class:`DifferentiableRenyi_ELBO`, α = 0.

    .. math::
        \mathcal{L}_K = \mathbb{E}_{z_{1:K} \sim q}\Big[\log \frac{1}{K}
        \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k \mid x)}\Big]

    Args:
        num_particles: K.
        max_plate_nesting: as in :class:`~pyro.infer.ELBO`.
        vectorize_particles: as in :class:`~pyro.infer.ELBO` (default ``True``).
        strict_enumeration_warning: as in :class:`~pyro.infer.ELBO`.
    """

    def __init__(
        self,
        num_particles: int = DEFAULT_NUM_IW_PARTICLES,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
    ) -> None:
        super().__init__(
            alpha=0.0,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
        )


class DifferentiableTraceGraph_ELBO(TraceGraph_ELBO):
    r"""Pyro's :class:`~pyro.infer.TraceGraph_ELBO` with ``differentiable_loss``.

    .. math::
        \mathcal{L} = \mathbb{E}_{q}\big[\log p(x, z) - \log q(z \mid x)\big]

    The value is :math:`-\mathcal{L}` (one Monte Carlo estimate); the gradient is Pyro's
    surrogate: pathwise terms for reparameterised sites, score-function terms with downstream
    (Rao-Blackwellised) costs and the optional baselines of ``site["infer"]["baseline"]`` for the
    others. The baseline losses (for neural / fixed-value baselines) are part of the gradient but
    not of the value, exactly as in ``loss_and_grads``.
    """

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        if not torch.is_tensor(surrogate_loss):
            raise ConfigError("the model and guide have no sample sites: nothing to estimate")
        loss = -elbo.detach() if torch.is_tensor(elbo) else surrogate_loss.new_tensor(-elbo)
        warn_if_nan(loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())


class TraceSTL_ELBO(_BackwardMixin, Trace_ELBO):
    r""" "Sticking the landing" (Roeder et al. 2017): the ELBO without q's score term.

    .. math::
        \hat\nabla_\phi = \nabla_\phi \big[\log p(x, z(\phi)) - \log q(z(\phi);\, \bar\phi)\big],
        \quad z(\phi) = g_\phi(\epsilon)

    The value is the ELBO estimate of :class:`~pyro.infer.Trace_ELBO` (negated); the model's
    gradient is unchanged; the guide's gradient drops :math:`-\nabla_\phi \log q(z;\phi)|_{z}`,
    whose mean is zero, so it is unbiased and exactly zero when q is the exact posterior.
    The surrogate is :math:`\log p(x,z) - \log q(z;\phi) + \log q(\bar z;\phi)` (module
    docstring). All latent guide sites must be reparameterisable.

    Args:
        num_particles: particles averaged.
        max_plate_nesting: as in :class:`~pyro.infer.ELBO`.
        vectorize_particles: as in :class:`~pyro.infer.ELBO`.
        **kwargs: other :class:`~pyro.infer.ELBO` options.
    """

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[poutine.Trace, poutine.Trace]:
        return _reparameterised_importance_trace(
            "stl", self.max_plate_nesting, model, guide, args, kwargs, scale_gradients=False
        )

    def _differentiable_loss_particle(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace
    ) -> tuple[float, torch.Tensor]:
        elbo_particle = 0.0
        surrogate_particle: torch.Tensor | float = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo_particle = elbo_particle + torch_item(site["log_prob_sum"])
                surrogate_particle = surrogate_particle + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                elbo_particle = elbo_particle - torch_item(site["log_prob_sum"])
                surrogate_particle = surrogate_particle - site["log_prob_sum"]
                if _SG_LOG_PROB in site:
                    surrogate_particle = surrogate_particle + site[_SG_LOG_PROB].sum()
        return -elbo_particle, -surrogate_particle


class TraceDReG_ELBO(IWAE_ELBO):
    r"""Doubly reparameterised gradients of the IWAE bound (Tucker et al. 2019).

    .. math::
        \hat\nabla_\phi = \sum_{k=1}^K \tilde w_k^2\,
        \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial \phi},
        \qquad
        \hat\nabla_\theta = \sum_{k=1}^K \tilde w_k\, \nabla_\theta \log p_\theta(x, z_k),
        \qquad \tilde w_k = \frac{w_k}{\sum_j w_j}

    where :math:`\log w_k = \log p(x, z_k) - \log q(z_k;\,\bar\phi)` (q's parameters held
    constant). The value is the negative IWAE bound (as :class:`IWAE_ELBO`); both gradients are
    unbiased for its gradient. Both come from one surrogate,

    .. math::
        S = \sum_k \bar{\tilde w}_k \big[\log p(x, \tilde z_k) - \log q(\tilde z_k;\phi)
        + \log q(\bar z_k; \phi)\big],

    where :math:`\tilde z_k` equals :math:`z_k` in value but a hook multiplies the gradient that
    flows back through it by :math:`\tilde w_k` (known only after the forward pass). The
    :math:`\phi`-dependence of S then runs only through :math:`\tilde z_k` (the two explicit
    :math:`\log q` terms cancel in :math:`\phi`), so it is weighted :math:`\tilde w_k^2`, while
    :math:`\theta` enters through :math:`\log p` only, weighted :math:`\tilde w_k`. The model
    (decoder) gradient is therefore identical to :class:`IWAE_ELBO`'s on the same samples.
    All latent guide sites must be reparameterisable.

    Args:
        num_particles: K.
        max_plate_nesting: as in :class:`~pyro.infer.ELBO`.
        vectorize_particles: as in :class:`~pyro.infer.ELBO` (default ``True``).
        strict_enumeration_warning: as in :class:`~pyro.infer.ELBO`.
    """

    def _get_trace(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> tuple[poutine.Trace, poutine.Trace]:
        return _reparameterised_importance_trace(
            "dreg",
            self.max_plate_nesting,
            model,
            guide,
            args,
            kwargs,
            scale_gradients=torch.is_grad_enabled(),
        )

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        log_weights = []
        brackets = []
        latent_sites = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_weight: torch.Tensor | float = 0.0
            bracket: torch.Tensor | float = 0.0
            for site in model_trace.nodes.values():
                if site["type"] == "sample":
                    log_p = _sum_dims_keepdim(site["log_prob"], sum_dims)
                    log_weight = log_weight + log_p.detach()
                    bracket = bracket + log_p
            sites = []
            for site in guide_trace.nodes.values():
                if site["type"] != "sample":
                    continue
                log_q = _sum_dims_keepdim(site["log_prob"], sum_dims)
                log_weight = log_weight - log_q.detach()
                if _TILDE_LOG_PROB in site:
                    bracket = (
                        bracket
                        - _sum_dims_keepdim(site[_TILDE_LOG_PROB], sum_dims)
                        + _sum_dims_keepdim(site[_SG_LOG_PROB], sum_dims)
                    )
                    sites.append(site)
                else:
                    bracket = bracket - log_q
            if not torch.is_tensor(log_weight):
                raise ConfigError("the model and guide have no sample sites: nothing to estimate")
            log_weights.append(log_weight)
            brackets.append(bracket)
            latent_sites.append(sites)

        num_particles = self.num_particles
        if self.vectorize_particles and num_particles > 1:
            # One trace; the particle plate is dim -max_plate_nesting of every log weight.
            dim = -int(self.max_plate_nesting)
            log_weight = log_weights[0]
            if log_weight.dim() < -dim:
                log_weight = log_weight.reshape((1,) * (-dim - log_weight.dim()) + log_weight.shape)
            normalized = torch.softmax(log_weight, dim=dim)
            iwae = torch.logsumexp(log_weight, dim=dim) - math.log(num_particles)
            weights = [normalized]
        else:
            stacked = torch.stack(torch.broadcast_tensors(*log_weights))
            normalized = torch.softmax(stacked, dim=0)
            iwae = torch.logsumexp(stacked, dim=0) - math.log(num_particles)
            weights = list(normalized.unbind(0))

        surrogate = 0.0
        for weight, bracket, sites in zip(weights, brackets, latent_sites):
            surrogate = surrogate + (weight * bracket).sum()
            for site in sites:
                tilde = site[_TILDE_VALUE]
                if tilde.requires_grad:
                    site_weight = _weight_for_site(weight, site)
                    tilde.register_hook(lambda grad, w=site_weight: grad * w)
        loss = -iwae.sum()
        surrogate_loss = -surrogate
        warn_if_nan(loss, "loss")
        return loss + (surrogate_loss - surrogate_loss.detach())


def _weight_for_site(weight: torch.Tensor, site: dict) -> torch.Tensor:
    """Broadcast per-particle normalised weights (plate-aligned) to a site's value shape."""
    batch_shape = site["fn"].batch_shape
    while weight.dim() > len(batch_shape):
        weight = weight.squeeze(0)
    weight = torch.broadcast_to(weight, batch_shape)
    return weight.reshape(batch_shape + (1,) * site["fn"].event_dim)


class MeanField_ELBO(TraceMeanField_ELBO):
    r"""``TraceMeanField_ELBO`` that says when it falls back to Monte Carlo for a KL term.

    Pyro's class uses the analytic :math:`\mathrm{KL}(q \,\|\, p)` where one is registered and
    silently estimates it by Monte Carlo otherwise. This one computes the same loss and issues one
    ``UserWarning`` per pair of distribution types (per estimator object) with no registered KL,
    so a user who declares a new prior knows which KL term is sampled.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kl_checked: set[tuple[str, type, type]] = set()

    def _differentiable_loss_particle(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace
    ) -> Any:
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or name not in model_trace.nodes:
                continue
            m_site = model_trace.nodes[name]
            key = (name, type(site["fn"]), type(m_site["fn"]))
            if m_site["is_observed"] or key in self._kl_checked:
                continue
            self._kl_checked.add(key)
            try:
                kl_divergence(site["fn"], m_site["fn"])
            except NotImplementedError:
                warnings.warn(
                    f"meanfield: no KL is registered for KL({_dist_name(site['fn'])} || "
                    f"{_dist_name(m_site['fn'])}) at site {name!r}; that term is estimated by "
                    "Monte Carlo (register one with pyro.distributions.kl.register_kl)",
                    UserWarning,
                    stacklevel=2,
                )
        return super()._differentiable_loss_particle(model_trace, guide_trace)


def _dist_name(d: Any) -> str:
    while isinstance(d, torch.distributions.Independent):
        d = d.base_dist
    return type(d).__name__


@dataclass(frozen=True)
class _Estimator:
    build: Callable[[float | None, int, bool | None, int, dict], ELBO]
    argument: str | None  # what the ':' argument means, None if it takes none
    integer: bool = False


def _build_plain(cls: type[ELBO]) -> Callable[[float | None, int, bool | None, int, dict], ELBO]:
    def build(
        arg: float | None, num_particles: int, vectorize: bool | None, nesting: int, kwargs: dict
    ) -> ELBO:
        # Several particles are vectorised unless asked otherwise (2.1x faster at K = 5 on
        # digits; the same estimator, different draws).
        return cls(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1 if vectorize is None else vectorize,
            max_plate_nesting=nesting,
            **kwargs,
        )

    return build


def _build_renyi(
    arg: float | None, num_particles: int, vectorize: bool | None, nesting: int, kwargs: dict
) -> ELBO:
    # With one particle every Renyi bound is the ELBO; like iwae, default to K particles.
    k = num_particles if num_particles > 1 else DEFAULT_NUM_IW_PARTICLES
    return DifferentiableRenyi_ELBO(
        alpha=DEFAULT_RENYI_ALPHA if arg is None else arg,
        num_particles=k,
        vectorize_particles=True if vectorize is None else vectorize,
        max_plate_nesting=nesting,
        **kwargs,
    )


def _build_weighted(
    cls: type[IWAE_ELBO],
) -> Callable[[float | None, int, bool | None, int, dict], ELBO]:
    def build(
        arg: float | None, num_particles: int, vectorize: bool | None, nesting: int, kwargs: dict
    ) -> ELBO:
        if arg is not None:
            k = int(arg)
        elif num_particles > 1:
            k = num_particles
        else:
            k = DEFAULT_NUM_IW_PARTICLES
        return cls(
            num_particles=k,
            vectorize_particles=True if vectorize is None else vectorize,
            max_plate_nesting=nesting,
            **kwargs,
        )

    return build


_REGISTRY: dict[str, _Estimator] = {
    "trace": _Estimator(_build_plain(Trace_ELBO), None),
    "meanfield": _Estimator(_build_plain(MeanField_ELBO), None),
    "tracegraph": _Estimator(_build_plain(DifferentiableTraceGraph_ELBO), None),
    "enum": _Estimator(_build_plain(TraceEnum_ELBO), None),
    "renyi": _Estimator(_build_renyi, "alpha"),
    "iwae": _Estimator(_build_weighted(IWAE_ELBO), "K (number of particles)", integer=True),
    "stl": _Estimator(_build_plain(TraceSTL_ELBO), None),
    "dreg": _Estimator(_build_weighted(TraceDReG_ELBO), "K (number of particles)", integer=True),
}


def estimator_names() -> list[str]:
    r"""The registered estimator names, sorted.

    Returns:
        e.g. ``['dreg', 'enum', 'iwae', 'meanfield', 'renyi', 'stl', 'trace', 'tracegraph']``.
    """
    return sorted(_REGISTRY)


def parse_estimator(spec: str) -> tuple[str, float | None]:
    r"""Split an estimator spec ``name[:argument]`` and check both parts.

    Args:
        spec: ``"trace"``, ``"renyi:0.5"`` (:math:`\alpha \neq 1`; :math:`\alpha < 0` is
            accepted, as in Li and Turner, but is no longer a lower bound), ``"iwae:5"`` or
            ``"dreg:5"`` (K, a positive integer). Case and surrounding spaces are ignored.

    Returns:
        ``(name, argument)``; the argument is ``None`` when the spec has none (defaults are filled
        in by :func:`make_elbo`).

    Raises:
        ConfigError: unknown name (the message lists the known ones), an argument to an
            estimator that takes none, or a bad argument.

    Example:
        >>> parse_estimator("iwae:5")
        ('iwae', 5.0)
    """
    if not isinstance(spec, str):
        raise ConfigError(f"estimator must be a string like 'iwae:5', got {spec!r}")
    name, sep, raw = spec.strip().partition(":")
    name = name.strip().lower()
    raw = raw.strip()
    if name not in _REGISTRY:
        raise ConfigError(f"Unknown estimator {name!r}; expected one of {estimator_names()}")
    entry = _REGISTRY[name]
    if not sep:
        return name, None
    if entry.argument is None:
        raise ConfigError(f"estimator {name!r} takes no argument, got {spec!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"estimator {name!r} expects a number ({entry.argument}) after ':', got {raw!r}"
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"{entry.argument} of estimator {name!r} must be finite, got {raw!r}")
    if entry.integer and (value < 1 or value != int(value)):
        raise ConfigError(
            f"{entry.argument} of estimator {name!r} must be a positive integer, got {raw!r}"
        )
    if name == "renyi" and value == 1.0:
        raise ConfigError(
            "alpha of estimator 'renyi' must not be 1 (alpha = 1 is the ELBO: use 'trace'), "
            f"got {raw!r}"
        )
    return name, value


def make_elbo(
    spec: str,
    num_particles: int = 1,
    vectorize_particles: bool | None = None,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> ELBO:
    r"""Build the estimator named by ``spec``.

    Every returned object has ``differentiable_loss(model, guide, *args, **kwargs)``: value = the
    negative bound, gradient = the estimator's gradient (module docstring).

    Args:
        spec: see :func:`parse_estimator`.
        num_particles: particles per step. For ``iwae``/``dreg`` it is K unless the spec gives K
            (the spec wins); with neither (``num_particles == 1``) K is 5, since a one-particle
            importance-weighted bound is just the ELBO.
        vectorize_particles: evaluate the particles in one vectorised pass (an outer plate).
            ``None`` means the estimator's default: ``True`` for ``iwae`` and ``dreg``,
            ``False`` for the others.
        max_plate_nesting: plates in model and guide (1 for the data plate); the particle plate
            goes one to the left.
        **kwargs: other options of the Pyro ELBO class, e.g. ``strict_enumeration_warning``.

    Returns:
        A :class:`pyro.infer.ELBO`.

    Raises:
        ConfigError: a bad spec or option.

    Example:
        >>> make_elbo("iwae:5").num_particles
        5
    """
    name, arg = parse_estimator(spec)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ConfigError(f"`num_particles` must be a positive integer, got {num_particles!r}")
    if vectorize_particles is not None and not isinstance(vectorize_particles, bool):
        raise ConfigError(
            f"`vectorize_particles` must be True, False or None, got {vectorize_particles!r}"
        )
    if (
        isinstance(max_plate_nesting, bool)
        or not isinstance(max_plate_nesting, int)
        or max_plate_nesting < 0
    ):
        raise ConfigError(
            f"`max_plate_nesting` must be a non-negative integer, got {max_plate_nesting!r}"
        )
    return _REGISTRY[name].build(arg, num_particles, vectorize_particles, max_plate_nesting, kwargs)


def _reduce_to_particles_and_data(
    log_prob: torch.Tensor, site: dict, rank: int, data_dim: int
) -> torch.Tensor:
    """Sum a site's log prob over every dim but the particle dim (-rank) and the data dim."""
    if log_prob.dim() > rank:
        raise ConfigError(
            f"site '{site['name']}' has batch shape {tuple(log_prob.shape)}, more dims than "
            f"`max_plate_nesting` + 1 = {rank}; raise `max_plate_nesting`"
        )
    log_prob = log_prob.reshape((1,) * (rank - log_prob.dim()) + log_prob.shape)
    dims = [d for d in range(-rank + 1, 0) if d != data_dim]
    return log_prob.sum(dims, keepdim=True) if dims else log_prob


def _find_data_frame(*traces: poutine.Trace) -> Any:
    for trace in traces:
        for site in trace.nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.name == "data" and frame.vectorized:
                        return frame
    raise ConfigError(
        "log_likelihood needs the data batch in pyro.plate('data'), but no sample site of the "
        "model or guide is inside a vectorised plate named 'data'"
    )


def log_importance_weights(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: int,
) -> torch.Tensor:
    """Log importance weights of one vectorised chunk, shape (num_particles, N)."""
    dim = -(max_plate_nesting + 1)
    particles_guide = pyro.plate("log_likelihood_particles", num_particles, dim=dim)(guide)
    particles_model = pyro.plate("log_likelihood_particles", num_particles, dim=dim)(model)
    guide_trace = poutine.trace(particles_guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(particles_model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    frame = _find_data_frame(model_trace, guide_trace)
    if frame.full_size is not None and frame.full_size != frame.size:
        raise ConfigError(
            f"log_likelihood needs the whole batch in pyro.plate('data'), but it is subsampled "
            f"({frame.size} of {frame.full_size}); pass the batch to evaluate instead"
        )
    rank = max_plate_nesting + 1
    if -frame.dim > max_plate_nesting:
        raise ConfigError(
            f"pyro.plate('data') is at dim {frame.dim}, outside `max_plate_nesting` = "
            f"{max_plate_nesting}"
        )
    log_weight: torch.Tensor | float = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        if not site["is_observed"] and name not in guide_trace.nodes:
            continue  # sampled from the prior: proposal = prior, the two terms cancel
        log_p = scale_and_mask(
            site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"]), 1.0, site["mask"]
        )
        log_weight = log_weight + _reduce_to_particles_and_data(log_p, site, rank, frame.dim)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if name not in model_trace.nodes:
            raise ConfigError(
                f"guide site '{name}' does not appear in the model; log_likelihood does not "
                "support auxiliary guide variables"
            )
        log_q = scale_and_mask(
            site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"]), 1.0, site["mask"]
        )
        log_weight = log_weight - _reduce_to_particles_and_data(log_q, site, rank, frame.dim)
    if not torch.is_tensor(log_weight):
        raise ConfigError("the model has no observed sites: there is no likelihood to estimate")
    shape = [1] * rank
    shape[0] = num_particles
    shape[rank + frame.dim] = frame.size
    return log_weight.expand(shape).reshape(num_particles, frame.size)


def log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 1000,
    chunk_size: int = 100,
    max_plate_nesting: int = 1,
    **kwargs: Any,
) -> torch.Tensor:
    r"""Importance-sampled :math:`\log p(x)` per data point, with q as the proposal.

    .. math::
        \log \hat p(x_n) = \log \frac{1}{K} \sum_{k=1}^K
        \frac{p(x_n, z_{nk})}{q(z_{nk} \mid x_n)}, \quad z_{nk} \sim q(\cdot \mid x_n)

    A stochastic lower bound of :math:`\log p(x_n)` in expectation (the IWAE-K bound), which
    tightens as K grows. Computed under ``torch.no_grad`` in chunks of ``chunk_size``
    particles, each a vectorised pass with an outer plate at dim ``-(max_plate_nesting + 1)``;
    chunks are combined with a running ``logsumexp``, so memory is bounded by one chunk.

    Per data point: model and guide put the batch in ``pyro.plate("data")``; each site's log
    density is summed over every dim except the particle and data dims. Sites outside the data
    plate (global latents) have no data dim and count fully for every data point. Observed
    sites count in :math:`\log p`; model latents the guide does not sample are drawn from the
    prior by the model itself, so prior and proposal cancel and they are left out. Log
    densities are **unscaled**: ``site["scale"]`` (``poutine.scale``, used for beta and KL
    warm-up) is ignored, so evaluation does not depend on the training schedule; masks are
    honoured.

    Args:
        model: Pyro model, called as ``model(*args, **kwargs)``.
        guide: its guide.
        *args: model/guide arguments (e.g. the batch ``x`` of shape (N, ...)).
        num_samples: K, importance samples per data point.
        chunk_size: particles per vectorised pass (the last chunk may be smaller).
        max_plate_nesting: plates in model and guide.
        **kwargs: model/guide keyword arguments.

    Returns:
        (N,) tensor of :math:`\log \hat p(x_n)` in nats.

    Raises:
        ConfigError: bad sizes, no ``"data"`` plate, a subsampled data plate, or guide sites
            absent from the model.
    """
    for label, value in (("num_samples", num_samples), ("chunk_size", chunk_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"`{label}` must be a positive integer, got {value!r}")
    if (
        isinstance(max_plate_nesting, bool)
        or not isinstance(max_plate_nesting, int)
        or max_plate_nesting < 1
    ):
        raise ConfigError(
            f"`max_plate_nesting` must be a positive integer (the data plate), "
            f"got {max_plate_nesting!r}"
        )
    total: torch.Tensor | None = None
    remaining = num_samples
    with torch.no_grad():
        while remaining > 0:
            size = min(chunk_size, remaining)
            log_weight = log_importance_weights(model, guide, args, kwargs, size, max_plate_nesting)
            chunk = torch.logsumexp(log_weight, dim=0)
            total = chunk if total is None else torch.logaddexp(total, chunk)
            remaining -= size
    assert total is not None
    return total - math.log(num_samples)
