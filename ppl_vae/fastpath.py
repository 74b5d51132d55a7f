r"""The per-step loss used by the training loop, with a fast path for this engine's VAE.

:func:`build_loss` returns ``loss(x) -> Tensor`` whose value and gradient are those of
``elbo.differentiable_loss(vae.model, vae.guide, x)``.

For ``trace`` (:class:`~pyro.infer.Trace_ELBO`) and ``meanfield``
(:class:`~pyro.infer.TraceMeanField_ELBO`), any ``num_particles``, vectorised or not, on this
engine's :class:`~ppl_vae.vae.VAE`, the same quantity is computed directly, without Pyro's
tracing:

.. math::
    \mathcal{L}(x) = -\frac1K \sum_{k=1}^K \Big[\log p(x \mid z_k)
        + \beta\big(\log p(z_k) - \log q(z_k \mid x)\big)\Big],
    \qquad z_k = \texttt{q.rsample()},\; q = \texttt{vae.encoder}(x),

with :math:`\beta` = ``vae.kl_scale``; for ``meanfield`` the bracketed KL term is
:math:`-\beta\,\mathrm{KL}(q \,\|\, p)` wherever :func:`pyro.distributions.kl.kl_divergence` has
a registered closed form, and the Monte Carlo term above otherwise (as ``TraceMeanField_ELBO``).
The arithmetic mirrors Pyro's (same draws in the same order, same expansions over the particle
plate, same order of sums), so with the same seed the gradients are the ones Pyro computes and
the value differs only by float32 rounding (Pyro accumulates its reported value in float64).

**When the fast path is used.** The first call (with a positive ``kl_scale``) runs the Pyro
ELBO itself, with Pyro's validation, and records its traces; the fast path is switched on only
if they show exactly this engine's structure: guide site ``z``, model sites ``z`` then observed
``x``, in the ``data`` plate (and the particle plate), no masks, ``z`` scaled by ``kl_scale``,
``x`` unscaled, and a fully reparameterised guide (``has_rsample``, Pyro's default
``score_parts``). Anything else (another estimator, a subclass that redefines ``model`` or
``guide``, a prior with sample sites of its own, a score-function guide) keeps the plain Pyro
path for good. At every fast step the guide distribution is checked again: a type different
from the recorded one, or one without ``rsample`` (e.g. a family whose eval mode samples
exactly), or a ``kl_scale`` that is not a positive number, sends that step to Pyro.

After that first (validated) step the fast steps run with argument validation off
(:func:`pyro.validation_enabled` ``(False)`` around the step only): the training loop has already
checked every data split against the likelihood's support, and a non-finite parameter turns
into a non-finite loss, which the loop reports. ``validate=True`` keeps validation on.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.torch_distribution import (
    ExpandedDistribution,
    MaskedDistribution,
    TorchDistributionMixin,
)
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites

from .vae import VAE

__all__ = ["FastELBOLoss", "build_loss", "served_estimator"]

_PARTICLE_PLATE = "num_particles_vectorized"


def served_estimator(elbo: Any) -> str | None:
    """``"trace"`` or ``"meanfield"`` if ``elbo`` is exactly that Pyro class, else ``None``.

    Subclasses are not served: they may change the estimator (e.g. sticking-the-landing).
    """
    if type(elbo) is Trace_ELBO:
        return "trace"
    if type(elbo) is TraceMeanField_ELBO:
        return "meanfield"
    return None


def _is_engine_vae(vae: Any) -> bool:
    """The VAE runs :class:`VAE`'s own ``model`` and ``guide`` (the structure is probed too)."""
    return (
        isinstance(vae, VAE)
        and type(vae).model is VAE.model
        and type(vae).guide is VAE.guide
        and "model" not in vars(vae)
        and "guide" not in vars(vae)
    )


def _entropy_term_is_log_prob(d: Any) -> bool:
    """Pyro's ``score_parts`` of ``d`` is the default one: entropy term = ``log_prob``."""
    while True:
        score_parts = type(d).score_parts
        if score_parts is TorchDistributionMixin.score_parts:
            return True
        if isinstance(d, (ExpandedDistribution, MaskedDistribution)):
            d = d.base_dist
            continue
        return False


def _sample_sites(trace: poutine.Trace) -> list[dict]:
    trace = prune_subsample_sites(trace)
    return [site for site in trace.nodes.values() if site["type"] == "sample"]


def _site_scale(kl_scale: float, batch: int, particles: int | None) -> float:
    """The scale Pyro gives ``z``: ``poutine.scale``, then each plate's ``size / subsample``.

    Pyro multiplies and divides by the (full) plate sizes, which is not always exact in floating
    point (0.7 * 3 / 3 == 0.6999999999999998), so the same operations are repeated here.
    """
    scale = kl_scale * 1.0 * batch / batch
    if particles is not None:
        scale = scale * particles / particles
    return scale


def _same_number(a: Any, b: float) -> bool:
    return isinstance(a, Real) and float(a) == float(b)


class FastELBOLoss:
    r"""``loss(x)``: Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO`` loss of a :class:`VAE`.

    .. math:: \mathcal{L}(x) = -\tfrac1K \textstyle\sum_k \big[\log p(x \mid z_k)
        + \beta(\log p(z_k) - \log q(z_k \mid x))\big]

    See the module docstring for when the fast path is used; otherwise each call is
    ``elbo.differentiable_loss(vae.model, vae.guide, x)``.

    Args:
        elbo: a :class:`~pyro.infer.Trace_ELBO` or :class:`~pyro.infer.TraceMeanField_ELBO`.
        vae: the engine's :class:`~ppl_vae.vae.VAE`.
        validate: keep Pyro's argument validation on in the fast steps.

    Attributes:
        kind: ``"trace"`` or ``"meanfield"``.
        fast: whether the fast path is on (``None`` until the first call decides it).
        reason: why it is off (empty while it is on or undecided).
        steps: how many calls took each path, ``{"fast": n, "pyro": m}``.
    """

    def __init__(self, elbo: Any, vae: VAE, validate: bool = False) -> None:
        kind = served_estimator(elbo)
        if kind is None:
            raise TypeError(f"FastELBOLoss serves Trace_ELBO and TraceMeanField_ELBO, got {elbo!r}")
        self.elbo = elbo
        self.vae = vae
        self.kind = kind
        self.validate = validate
        self.fast: bool | None = None
        self.reason = ""
        self.steps = {"fast": 0, "pyro": 0}
        self._guide_type: type | None = None

    # -- the plain path and the probe -------------------------------------------------------
    def _pyro(self, x: torch.Tensor) -> torch.Tensor:
        self.steps["pyro"] += 1
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x)

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """Run Pyro's ELBO on traced model/guide and decide whether the fast path applies."""
        model = poutine.trace(self.vae.model)
        guide = poutine.trace(self.vae.guide)
        self.steps["pyro"] += 1
        loss = self.elbo.differentiable_loss(model, guide, x)
        self.reason = self._check(model.trace, guide.trace, x)
        self.fast = not self.reason
        return loss

    def _check(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace, x: torch.Tensor
    ) -> str:
        """Empty if the traces have exactly the structure the fast path computes, else why not."""
        particle = self.elbo.vectorize_particles and self.elbo.num_particles > 1
        n = x.shape[0]
        scale = _site_scale(self.vae.kl_scale, n, self.elbo.num_particles if particle else None)
        unit = _site_scale(1.0, n, self.elbo.num_particles if particle else None)
        plates = {"data"} | ({_PARTICLE_PLATE} if particle else set())
        guide_sites = _sample_sites(guide_trace)
        model_sites = _sample_sites(model_trace)
        if [s["name"] for s in guide_sites] != ["z"]:
            return f"guide sample sites are {[s['name'] for s in guide_sites]}, not ['z']"
        if [s["name"] for s in model_sites] != ["z", "x"]:
            return f"model sample sites are {[s['name'] for s in model_sites]}, not ['z', 'x']"
        gz, mz, mx = guide_sites[0], model_sites[0], model_sites[1]
        if gz["is_observed"] or mz["is_observed"] or not mx["is_observed"]:
            return "site 'z' must be latent and site 'x' observed"
        if mx["value"] is not x:
            return "site 'x' does not observe the data passed to the loss"
        for where, site, expected in (
            ("guide", gz, scale),
            ("model", mz, scale),
            ("model", mx, unit),
        ):
            if site["mask"] is not None:
                return f"{where} site {site['name']!r} is masked"
            if not _same_number(site["scale"], expected):
                return (
                    f"{where} site {site['name']!r} has scale {site['scale']}, expected {expected}"
                )
            if {f.name for f in site["cond_indep_stack"]} != plates:
                names = [f.name for f in site["cond_indep_stack"]]
                return (
                    f"{where} site {site['name']!r} is in plates {names}, expected {sorted(plates)}"
                )
            if site["infer"].get("enumerate"):
                return f"{where} site {site['name']!r} is enumerated"
        fn = gz["fn"]
        if not fn.has_rsample:
            return f"guide site 'z' ({type(fn).__name__}) has no rsample (score-function gradient)"
        if not _entropy_term_is_log_prob(fn):
            return f"guide site 'z' ({type(fn).__name__}) overrides score_parts"
        return ""

    # -- the fast path ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.vae.kl_scale
        if not (isinstance(scale, Real) and scale > 0) or self.fast is False:
            return self._pyro(x)
        if self.fast is None:
            return self._probe(x)
        if self.validate:
            return self._fast(x, scale)
        with pyro.validation_enabled(False):
            return self._fast(x, scale)

    def _fast(self, x: torch.Tensor, kl_scale: float) -> torch.Tensor:
        elbo = self.elbo
        num_particles = elbo.num_particles
        vectorized = elbo.vectorize_particles and num_particles > 1
        scale = _site_scale(kl_scale, x.shape[0], num_particles if vectorized else None)
        q = self._guide(x)
        if q is None:
            return self._pyro(x)
        self.steps["fast"] += 1
        if vectorized:
            q = q.expand(torch.Size([num_particles]) + q.batch_shape)
            return self._particle(x, q, scale) / num_particles
        loss = self._particle(x, q, scale)
        if num_particles == 1:
            return loss
        # Pyro re-runs the guide for every particle; so do we (same draws, same sums).
        total = loss / num_particles
        for _ in range(num_particles - 1):
            q = self._guide(x)
            if q is None:
                raise RuntimeError("the guide changed its distribution type between particles")
            total = total + self._particle(x, q, scale) / num_particles
        return total

    def _guide(self, x: torch.Tensor) -> Any:
        """q(z | x), or None if this step must go to Pyro (no rsample, or a new type)."""
        q = self.vae.encoder(x)
        if not q.has_rsample:
            return None
        if type(q) is not self._guide_type:
            if self._guide_type is not None:
                return None
            if not _entropy_term_is_log_prob(q):
                self.fast, self.reason = False, f"{type(q).__name__} overrides score_parts"
                return None
            self._guide_type = type(q)
        return q

    def _particle(self, x: torch.Tensor, q: Any, scale: float) -> torch.Tensor:
        r"""Surrogate loss of one (possibly vectorised) particle, summed like Pyro's."""
        vae = self.vae
        z = q.rsample()
        prior = vae.prior()
        p = prior.expand(q.batch_shape)
        log_px = vae.likelihood(vae.decoder(vae.prior.embed(z))).log_prob(x).sum()
        if self.kind == "meanfield":
            try:
                kl = kl_divergence(q, p)
            except NotImplementedError:
                pass
            else:
                if scale != 1:
                    kl = kl * scale
                kl_sum = kl.sum() if torch.is_tensor(kl) else kl * q.batch_shape.numel()
                return -(-kl_sum + log_px)
            log_p = p.log_prob(z)
            log_q = q.log_prob(z)
            if scale != 1:
                log_p = log_p * scale
                log_q = log_q * scale
            return -(log_p.sum() - log_q.sum() + log_px)
        log_p = p.log_prob(z)
        log_q = q.log_prob(z)
        if scale != 1:
            log_p = log_p * scale
            log_q = log_q * scale
        return -(log_p.sum() + log_px - log_q.sum())


def build_loss(
    elbo: Any, vae: Any, *, fast: bool = True, validate: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The training loss for ``vae`` under ``elbo`` (a registered estimator).

    .. math:: \mathcal{L}(x) = \texttt{elbo.differentiable\_loss(vae.model, vae.guide, x)}

    Args:
        elbo: the estimator (see :func:`~ppl_vae.estimators.make_elbo`).
        vae: the model/guide pair.
        fast: use :class:`FastELBOLoss` where it applies (``trace`` and ``meanfield`` on
            this engine's :class:`~ppl_vae.vae.VAE`).
        validate: keep Pyro's argument validation on in fast steps.

    Returns:
        ``loss(x) -> Tensor``, a scalar whose value and gradient are the estimator's.
    """
    if fast and served_estimator(elbo) is not None and _is_engine_vae(vae):
        return FastELBOLoss(elbo, vae, validate=validate)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return elbo.differentiable_loss(vae.model, vae.guide, x)

    return loss
