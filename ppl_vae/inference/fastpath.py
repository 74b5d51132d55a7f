r"""The per-step loss used by the training loop, with a fast path for this engine's VAE.

:func:`build_loss` returns ``loss(x) -> Tensor`` whose value and gradient are those of
``elbo.differentiable_loss(vae.model, vae.guide, x)``.

For ``trace`` (:class:`~pyro.infer.Trace_ELBO`) and ``meanfield``
(:class:`~pyro.infer.TraceMeanField_ELBO` and the engine's warning subclass), any
``num_particles``, vectorised or not, on this engine's :class:`~ppl_vae.vae.VAE`, the same
quantity is computed directly from the modules, without Pyro's tracing:

.. math::
    \mathcal{L}(x) = -\frac1K \sum_{k=1}^K \Big[\log p(x \mid z_k)
        + \beta\big(\log p(z_k) - \log q(z_k \mid x)\big)\Big],
    \qquad z_k = \texttt{q.rsample()},\; q = \texttt{vae.encoder}(x),

with :math:`\beta` = ``vae.kl_scale``; for ``meanfield`` the term in :math:`\beta` is
:math:`-\beta\,\mathrm{KL}(q \,\|\, p)` wherever :func:`pyro.distributions.kl.kl_divergence`
has a registered closed form, and the Monte Carlo term above otherwise (as
``TraceMeanField_ELBO`` does). Any prior, guide family and likelihood is handled through its
distributions' ``rsample``, ``log_prob``, ``expand`` and registered KLs.

**Equivalence.** The elementwise operations are Pyro's, in Pyro's order: the same draws (the
guide is re-run per particle, or expanded over the particle plate when vectorised), the prior
expanded over the batch, the site scale computed as Pyro's plates compute it
(``kl_scale * N / N``). Two reductions are fused: :math:`\log p(z) - \log q(z)` is summed once
rather than as two sums, and :math:`\log p(x \mid z)` is the likelihood's
:meth:`~ppl_vae.models.likelihoods.base.Likelihood.log_prob_sum` (for Bernoulli one
``binary_cross_entropy_with_logits`` with ``reduction="sum"``; otherwise the distribution's
``log_prob(x).sum()``). A sum's gradient is exactly one per element, so with the same seed the
gradients stay bitwise equal to Pyro's, and the value differs only by float32 rounding (Pyro
adds its three sums in float64): see ``tests/test_fastpath.py``. (A mixture prior under
vectorised particles is the exception: Pyro's plate expands its components in another order,
and the gradients agree to about 2e-7 of their largest entry.) The fast path makes no
host-device synchronisation; Pyro's path makes 25-27 per step with validation on (``.item()`` of
every log-prob sum, NaN/inf warnings, argument checks).

**When it is used.** The first call with a positive ``kl_scale`` runs the Pyro ELBO itself, with
Pyro's validation and warnings, on traced copies of ``model`` and ``guide`` (and, once the fast
path is on, rewinds the random state and returns the fast path's value of the same draws, so a
step's value never depends on being a process's first); the fast path is switched on only if
the traces show exactly this engine's structure: guide site ``z``; model
sites ``z``, then ``x`` observing the data; only the ``data`` plate (and the particle plate);
no masks; ``z`` scaled by ``kl_scale``, ``x`` unscaled; a fully reparameterised guide site
(``has_rsample`` and Pyro's default ``score_parts``). The types of q(z|x) and of p(z) in that
step are recorded. Anything else (another estimator, a :class:`~ppl_vae.vae.VAE` subclass that
redefines ``model`` or ``guide``, a prior with sample sites of its own, a score-function
guide) keeps Pyro's path for good. At every later step a q(z|x) without ``rsample``, a q or p of
another type than recorded (e.g. a family whose eval mode samples exactly), or a ``kl_scale``
that is not a positive number sends that step to Pyro, before any random number is drawn.
Warnings follow: the engine's ``meanfield`` warns once per pair of types when it falls back to
Monte Carlo, which happens in the first (Pyro) step for the recorded pair.

**Validation.** The fast steps run with argument validation off
(:func:`pyro.validation_enabled` ``(False)`` around the step only; ``validate=True`` keeps it
on). The first step was validated; the training loop checks every data split against the
likelihood's support before training; a non-finite parameter gives a non-finite loss, which the
loop reports as a :class:`~ppl_vae.train.TrainingError` like the validation error would be.
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

from ..vae import VAE
from . import estimators

__all__ = ["FastELBOLoss", "build_loss", "served_estimator"]

_PARTICLE_PLATE = "num_particles_vectorized"


def _served_classes() -> dict[type, str]:
    classes: dict[type, str] = {Trace_ELBO: "trace", TraceMeanField_ELBO: "meanfield"}
    # The engine's meanfield estimator: TraceMeanField_ELBO plus a warning when a KL term is
    # estimated by Monte Carlo (issued by Pyro's path in the first step; see FastELBOLoss).
    engine_meanfield = getattr(estimators, "MeanField_ELBO", None)
    if isinstance(engine_meanfield, type) and issubclass(engine_meanfield, TraceMeanField_ELBO):
        classes[engine_meanfield] = "meanfield"
    return classes


def served_estimator(elbo: Any) -> str | None:
    """``"trace"`` or ``"meanfield"`` if the fast path can compute ``elbo``'s loss, else ``None``.

    Served: exactly :class:`~pyro.infer.Trace_ELBO`, :class:`~pyro.infer.TraceMeanField_ELBO`
    and the engine's ``meanfield`` estimator. Other subclasses are not: they may change the
    estimator (e.g. sticking-the-landing).
    """
    return _served_classes().get(type(elbo))


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


def _torch_rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The states of torch's CPU generator and, for a CUDA ``device``, of its generator: the
    streams a step's draws on ``device`` come from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_torch_rng_state(
    state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device
) -> None:
    """Rewinds the generators to ``state`` (from :func:`_torch_rng_state` on ``device``)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
        elbo: a served estimator (:func:`served_estimator`).
        vae: the engine's :class:`~ppl_vae.vae.VAE`.
        validate: keep argument validation on in the fast steps.

    Attributes:
        kind: ``"trace"`` or ``"meanfield"``.
        fast: whether the fast path is on (``None`` until the first call decides).
        reason: why it is off (empty while it is on or undecided).
        steps: how many calls took each path, ``{"fast": n, "pyro": m}``.

    Example:
        >>> vae = build_vae((64,), latent_dim=2, hidden_dims=(8,))  # doctest: +SKIP
        >>> loss = FastELBOLoss(make_elbo("trace"), vae)  # doctest: +SKIP
        >>> loss(x).backward()  # first call: Pyro's ELBO, then the fast path  # doctest: +SKIP
    """

    def __init__(self, elbo: Any, vae: VAE, validate: bool = False) -> None:
        kind = served_estimator(elbo)
        if kind is None:
            raise TypeError(f"the fast path does not serve {type(elbo).__name__}")
        self.elbo = elbo
        self.vae = vae
        self.kind = kind
        self.validate = validate
        self.fast: bool | None = None
        self.reason = ""
        self.steps = {"fast": 0, "pyro": 0}
        # Distribution types seen at the validated Pyro step: q(z|x) as the encoder returns it,
        # and p(z) expanded over the batch as the model's site holds it.
        self._guide_type: type | None = None
        self._prior_type: type | None = None

    # -- the Pyro path and the probe --------------------------------------------------------
    def _pyro(self, x: torch.Tensor) -> torch.Tensor:
        self.steps["pyro"] += 1
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x)

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """Run Pyro's ELBO on traced model/guide; switch the fast path on if the traces allow.

        When it switches on, the step's value is the fast path's, of the same draws (the random
        state is rewound to before Pyro's step), so that the value of a step does not depend on
        whether it was the first of a process: a resumed run's history equals an uninterrupted
        run's bitwise, not only its parameters."""
        rng = _torch_rng_state(x.device)
        model = poutine.trace(self.vae.model)
        guide = poutine.trace(self.vae.guide)
        self.steps["pyro"] += 1
        loss = self.elbo.differentiable_loss(model, guide, x)
        self.reason = self._check(model.trace, guide.trace, x)
        self.fast = not self.reason
        if not self.fast:
            return loss
        _set_torch_rng_state(rng, x.device)
        return self(x)

    def _check(
        self, model_trace: poutine.Trace, guide_trace: poutine.Trace, x: torch.Tensor
    ) -> str:
        """Empty if the traces have exactly the structure the fast path computes, else why not."""
        num_particles = self.elbo.num_particles
        vectorized = self.elbo.vectorize_particles and num_particles > 1
        n = x.shape[0]
        scale = _site_scale(self.vae.kl_scale, n, num_particles if vectorized else None)
        unit = _site_scale(1.0, n, num_particles if vectorized else None)
        plates = {"data"} | ({_PARTICLE_PLATE} if vectorized else set())
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
            name = site["name"]
            if site["mask"] is not None:
                return f"{where} site {name!r} is masked"
            if not _same_number(site["scale"], expected):
                return f"{where} site {name!r} has scale {site['scale']}, expected {expected}"
            if {f.name for f in site["cond_indep_stack"]} != plates:
                names = [f.name for f in site["cond_indep_stack"]]
                return f"{where} site {name!r} is in plates {names}, expected {sorted(plates)}"
            if site["infer"].get("enumerate"):
                return f"{where} site {name!r} is enumerated"
        fn = gz["fn"]
        if not fn.has_rsample:
            return f"guide site 'z' ({type(fn).__name__}) has no rsample (score-function gradient)"
        if not _entropy_term_is_log_prob(fn):
            return f"guide site 'z' ({type(fn).__name__}) overrides score_parts"
        # The plate expands q(z|x); a class without its own ``expand`` is wrapped.
        self._guide_type = type(fn.base_dist if type(fn) is ExpandedDistribution else fn)
        self._prior_type = type(mz["fn"])
        return ""

    # -- the fast path ------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kl_scale = self.vae.kl_scale
        if self.fast is False or not (isinstance(kl_scale, Real) and kl_scale > 0):
            return self._pyro(x)
        if self.fast is None:
            return self._probe(x)
        if self.validate:
            return self._fast(x, float(kl_scale))
        with pyro.validation_enabled(False):
            return self._fast(x, float(kl_scale))

    def _fast(self, x: torch.Tensor, kl_scale: float) -> torch.Tensor:
        elbo = self.elbo
        modules = self.vae._modules
        encoder, prior_module = modules["encoder"], modules["prior"]
        num_particles = elbo.num_particles
        vectorized = elbo.vectorize_particles and num_particles > 1
        scale = _site_scale(kl_scale, x.shape[0], num_particles if vectorized else None)
        # Pyro runs the guide, then the model; only q.rsample() draws random numbers, so p(z)
        # may be built first, which lets a step with unexpected types go to Pyro untouched.
        q = encoder(x)
        if vectorized:
            q = q.expand(torch.Size([num_particles]) + q.batch_shape)
        p = prior_module().expand(q.batch_shape)
        if not self._same_types(q, p):
            return self._pyro(x)
        self.steps["fast"] += 1
        if vectorized:
            return self._particle(x, q, p, scale) / num_particles
        loss = self._particle(x, q, p, scale)
        if num_particles == 1:
            return loss
        # Pyro re-runs the guide and the model for every particle; so does this.
        loss = loss / num_particles
        for _ in range(num_particles - 1):
            q = encoder(x)
            p = prior_module().expand(q.batch_shape)
            if not self._same_types(q, p):
                raise RuntimeError(
                    "q(z|x) or p(z) changed type between the particles of one step: "
                    f"{type(q).__name__}, {type(p).__name__}"
                )
            loss = loss + self._particle(x, q, p, scale) / num_particles
        return loss

    def _same_types(self, q: Any, p: Any) -> bool:
        """q has rsample and q, p are of the types Pyro's validated step saw."""
        q_type = type(q.base_dist) if type(q) is ExpandedDistribution else type(q)
        return q.has_rsample and q_type is self._guide_type and type(p) is self._prior_type

    def _particle(self, x: torch.Tensor, q: Any, p: Any, scale: float) -> torch.Tensor:
        """Surrogate loss of one (possibly vectorised) particle, summed in Pyro's order."""
        modules = self.vae._modules
        prior_module = modules["prior"]
        z = q.rsample()
        out = modules["decoder"](prior_module.embed(z))
        log_px = modules["likelihood"].log_prob_sum(out, x)
        if self.kind == "meanfield":
            try:
                kl = kl_divergence(q, p)
            except NotImplementedError:
                # Monte Carlo, as TraceMeanField_ELBO (its warning, if any, came in the probe).
                log_p = p.log_prob(z)
                log_q = q.log_prob(z)
                if scale != 1:
                    log_p = log_p * scale
                    log_q = log_q * scale
                return -(log_p.sum() - log_q.sum() + log_px)
            if scale != 1:
                kl = kl * scale
            kl_sum = kl.sum() if torch.is_tensor(kl) else kl * q.batch_shape.numel()
            return -(-kl_sum + log_px)
        # One reduction for both densities: sum(log p - log q) rather than Pyro's two sums.
        log_ratio = p.log_prob(z) - q.log_prob(z)
        if scale != 1:
            log_ratio = log_ratio * scale
        return -(log_ratio.sum() + log_px)


def build_loss(
    elbo: Any, vae: Any, *, fast: bool = True, validate: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The training loss for ``vae`` under ``elbo`` (a registered estimator).

    .. math:: \mathcal{L}(x) = \texttt{elbo.differentiable\_loss(vae.model, vae.guide, x)}

    Args:
        elbo: the estimator (see :func:`~ppl_vae.inference.estimators.make_elbo`).
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
