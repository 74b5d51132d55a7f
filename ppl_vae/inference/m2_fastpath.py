r"""M2's three step-loss terms, with a fast path for the engine's :class:`~ppl_vae.ssl.SSVAE`.

:class:`M2Loss` computes what :meth:`ppl_vae.kinds.m2.M2Kind.loss` asks of Pyro:

- ``labelled(x, y)`` = ``labelled_elbo.differentiable_loss(model.model, model.guide, x, y)``,
- ``classification(x, y, s)`` = ``class_elbo.differentiable_loss(model.classifier_model,
  model.classifier_guide, x, y, s)``,
- ``unlabelled(x)`` = ``unlabelled_elbo.differentiable_loss(model.model, model.guide, x)``.

Where the estimator is :class:`~pyro.infer.Trace_ELBO` (labelled and classification terms, the
unlabelled term of a reparameterised label guide such as ``relaxed``) or
:class:`~pyro.infer.TraceEnum_ELBO` (the unlabelled term of the ``enumerate`` guide), with one
particle, each term is computed directly from the modules, without Pyro's tracing:

.. math::
    -\mathcal{U}(x) = -\sum_{n}\sum_{k=1}^{K} q_\phi(k \mid x_n)\big[\log p(k) + \log p(z_{nk})
    + \log p(x_n \mid z_{nk}, k) - \log q_\phi(k \mid x_n) - \log q(z_{nk} \mid x_n, k)\big],
    \quad z_{nk} = \texttt{q\_z}(x_n, e_k)\texttt{.rsample()}

for the enumerated term (one z per class and point, batch ``(K, N)``, as ``TraceEnum_ELBO``
draws them), and for the ``Trace_ELBO`` terms the sum of the model's log-densities minus the
guide's at the guide's draws (:math:`\log p(y) + \log p(z) + \log p(x \mid z, y) - \log q(z
\mid x, y)` labelled; the same plus :math:`-\log q(y \mid x)` at a relaxed draw of y unlabelled;
:math:`s \sum_n \log q_\phi(y_n \mid x_n)` for the classification term).

**Equivalence: the same estimator, equal up to float rounding.** The fast path calls the
modules' own methods (``label_guide.guide_dist``, ``label_guide.prior``, ``label_guide.dist``,
``model.q_z``, ``prior.log_density``, ``prior.embed``, the decoder, the likelihood) and draws the
same random numbers in the same order (the guide's, then the model's), so it sees the same
:math:`z` and relaxed :math:`y` as Pyro's step. :math:`\log p(z)` is the prior's
:meth:`~ppl_vae.models.priors.base.Prior.log_density`, by contract the ``log_prob`` of the
distribution ``SSVAE.p_z`` returns (``prior(y)`` or ``prior()``); the fixed standard Gaussian
computes it without building that distribution. Where an SSVAE redefines ``p_z``, its
distribution's ``log_prob``. It re-implements only what the engine's
``SSVAE.model``, ``SSVAE.guide``, ``SSVAE.classifier_model``, ``SSVAE.one_hot`` and
``LabelGuide.sample`` do, which must therefore be the engine's own (not redefined by a subclass
or an instance). What it does not repeat is Pyro's bookkeeping around the arithmetic:

- the distributions are not expanded over the data plate (their log-densities broadcast to
  ``(N,)`` or ``(K, N)``, which is checked; any other shape sends the step to Pyro);
- each term is one fused sum per point, added in float32, where ``Trace_ELBO`` sums every site
  on its own and adds the sums in float64 on the host (a synchronisation per site);
- the enumerated term weighs each class's cost by :math:`q(k \mid x_n) = \exp \log q(k \mid
  x_n)` in one product and sum, which is what ``TraceEnum_ELBO``'s ``Dice`` computes for this
  model (a log-space contraction with nothing to sum out) with one ``tensordot`` per site on
  its packed layout. Where some :math:`q(k \mid x_n)` underflows to 0, ``Dice`` drops those
  terms and the fast path adds them as zeros (their costs are finite);
- the engine's Bernoulli likelihood scores a point as
  ``-binary_cross_entropy_with_logits(...).sum()`` rather than
  ``(-binary_cross_entropy(...)).sum()``.

So the values and gradients differ from Pyro's by the rounding of the summation order alone:
``tests/test_m2_fastpath.py`` requires agreement to 1e-10 in float64 for both label guides,
every prior M2 takes and every likelihood (and to 1e-5 in float32), and a term left out or a
gradient path cut fails it. Earlier releases repeated Pyro's operations in Pyro's order to be
bitwise equal; that bookkeeping cost 0.9-1.5 ms of a 17-35 ms step at 64 dimensions on one CPU
thread (the two paths timed in one process; README, "The M2 step"). A run is still
deterministic: the same seed gives the same numbers, and a resumed run is exactly the
uninterrupted one.

**When it is used.** Each term decides on its own. Its first call runs the Pyro ELBO itself,
with Pyro's validation and warnings, on traced copies of the programs (counted in ``steps`` as a
Pyro evaluation); the term's fast path is switched on only if the traces show exactly the
engine's structure: guide sites ``z`` (labelled) or ``y``, ``z`` (unlabelled); model sites
``y``, ``z``, ``x`` (``y_class`` for the classification term) with ``x`` observing the data
passed in and ``y`` observed where labelled (``y_class`` observing the labels passed in); only
the ``data`` plate; no masks; every site unscaled except ``y_class`` (scaled by ``s`` exactly as
Pyro's plate and ``poutine.scale`` compute it); ``y`` enumerated in parallel over ``(K, 1, K)``
one-hot values for ``TraceEnum_ELBO`` and reparameterised (with Pyro's default ``score_parts``)
for ``Trace_ELBO``, likewise ``z``. The types of the sites' distributions in that step are
recorded, and the call returns the fast path's value, computed from the random state the probe
started from (so a run's every step is the fast path's, and a resumed run, which probes again,
takes the uninterrupted run's step). Anything else keeps that term on Pyro's path for good:
another estimator (meanfield, IWAE, ``TraceGraph_ELBO`` and score-function guides, any
subclass), more than one particle, an SSVAE or label guide redefining the methods above, a
prior, decoder or likelihood with sample sites of its own. A later step whose distributions are
of other types than recorded (say, the relaxed label guide in eval mode, which draws exact
one-hot labels) goes to Pyro. A type is checked where its distribution is built, which may be
after a draw (p(z) after q(z|x)'s ``rsample``, and every network's dropout masks), so torch's
generator is saved before each fast step and rewound on such a fall-back: the step is then
exactly the one Pyro takes. Label-conditional priors :math:`p(z \mid y)` are served: their
``log_density`` receives the same one-hot (or enumerated, or relaxed) labels as ``p_z`` in Pyro's
model.

**Validation.** Fast steps run with Pyro's validation off (``validate=True`` keeps it on). The
first step of each term was validated; the data splits and the labels are checked before
training (``prepare_data``, the label checks of :func:`~ppl_vae.ssl.build_ssl_run`); a
non-finite parameter gives a non-finite loss, which the training loop reports.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.util import is_validation_enabled

from ..guides.labels.base import LabelGuide
from ..models.likelihoods.bernoulli import BernoulliLikelihood
from .fastpath import (
    _entropy_term_is_log_prob,
    _sample_sites,
    _set_torch_rng_state,
    _torch_rng_state,
)

__all__ = ["TERMS", "M2Loss", "served_estimator"]

#: The terms of the step loss, in the order :meth:`~ppl_vae.kinds.m2.M2Kind.loss` computes them.
TERMS = ("labelled", "classification", "unlabelled")

# The SSVAE methods the fast path re-implements, which must therefore be the engine's own.
_SSVAE_METHODS = ("model", "guide", "classifier_model", "classifier_guide", "one_hot")


def served_estimator(elbo: Any) -> str | None:
    """``"trace"`` / ``"enum"`` if the fast path can compute ``elbo``'s terms, else ``None``.

    Served: exactly :class:`~pyro.infer.Trace_ELBO` and :class:`~pyro.infer.TraceEnum_ELBO`
    (no subclass: it may change the estimator), with one particle.
    """
    if getattr(elbo, "num_particles", None) != 1:
        return None
    return {Trace_ELBO: "trace", TraceEnum_ELBO: "enum"}.get(type(elbo))


def _uses_engine_method(obj: Any, name: str, base: type) -> bool:
    """``obj.name`` is ``base``'s own method (not redefined by a subclass or the instance)."""
    return getattr(type(obj), name) is getattr(base, name) and name not in vars(obj)


def _is_engine_pair(model: Any) -> str:
    """Empty if ``model`` runs the engine's SSVAE programs and label-guide ``sample``, else why."""
    from ..ssl import SSVAE

    if not isinstance(model, SSVAE):
        return f"{type(model).__name__} is not an SSVAE"
    for name in _SSVAE_METHODS:
        if not _uses_engine_method(model, name, SSVAE):
            return f"{type(model).__name__} redefines {name}"
    guide = model.label_guide
    if not isinstance(guide, LabelGuide):
        return f"the label guide {type(guide).__name__} is not a LabelGuide"
    if not _uses_engine_method(guide, "sample", LabelGuide):
        return f"the label guide {type(guide).__name__} redefines sample"
    return ""


def _engine_p_z() -> Callable:
    """``SSVAE.p_z``: ``prior(y)`` for a label-conditional prior, else ``prior()``."""
    from ..ssl import SSVAE

    return SSVAE.p_z


def _log_prob_points(likelihood: Any, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log p(x \mid \eta)` per point, the model's ``x`` site.

    The engine's Bernoulli (validation off, data of the logits' dtype and trailing shape):
    ``-binary_cross_entropy_with_logits`` summed over the pixels, the kernel of
    ``Bernoulli(logits).log_prob`` with the sign applied after the sum instead of before it (one
    pass over ``(K, N, D)`` fewer forward and backward). Any other likelihood: its distribution's
    ``log_prob``.
    """
    if type(likelihood) is BernoulliLikelihood and not is_validation_enabled():
        (logits,) = likelihood.split(out)
        if x.dtype == logits.dtype and logits.shape[logits.dim() - x.dim() :] == x.shape:
            bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
            batch = bce.shape[: bce.dim() - likelihood.event_dim]
            return -bce.reshape(*batch, -1).sum(-1)
    return likelihood(out).log_prob(x)


def _family(d: Any) -> type:
    """The type of ``d``, or of its base for Pyro's wrapper of classes without ``expand``."""
    return type(d.base_dist) if type(d) is ExpandedDistribution else type(d)


def _pyro_scale(scale: float, n: int) -> float:
    """The scale of a site inside ``pyro.plate(..., n)`` (no subsampling) and
    ``poutine.scale(scale)``.

    ``poutine.scale`` multiplies first (``scale * 1.0``), then the plate by
    ``size / subsample_size``; the operations are repeated because they are not always exact
    (0.7 * 3 / 3 == 0.6999999999999998).
    """
    return scale * 1.0 * n / n


def _check_sites(
    where: str, sites: list[dict], names: list[str], observed: set[str], scales: dict[str, float]
) -> str:
    """Empty if ``sites`` are ``names`` in order, observed as told, in the data plate alone,
    unmasked, scaled as ``scales`` says (1.0 otherwise)."""
    found = [s["name"] for s in sites]
    if found != names:
        return f"{where} sample sites are {found}, not {names}"
    for site in sites:
        name = site["name"]
        if bool(site["is_observed"]) != (name in observed):
            state = "observed" if site["is_observed"] else "latent"
            return f"{where} site {name!r} is {state}"
        if site["mask"] is not None:
            return f"{where} site {name!r} is masked"
        expected = scales.get(name, 1.0)
        scale = site["scale"]
        if not (isinstance(scale, Real) and float(scale) == expected):
            return f"{where} site {name!r} has scale {scale}, expected {expected}"
        plates = [f.name for f in site["cond_indep_stack"]]
        if plates != ["data"]:
            return f"{where} site {name!r} is in plates {plates}, expected ['data']"
    return ""


def _reparameterised(where: str, site: dict) -> str:
    """Empty if the guide site is drawn by ``rsample`` and scored by its ``log_prob`` alone."""
    fn = site["fn"]
    if site["infer"].get("enumerate"):
        return f"{where} site {site['name']!r} is enumerated"
    if not fn.has_rsample:
        return f"{where} site {site['name']!r} ({type(fn).__name__}) has no rsample"
    if not _entropy_term_is_log_prob(fn):
        return f"{where} site {site['name']!r} ({type(fn).__name__}) overrides score_parts"
    return ""


class _Fallback(Exception):
    """A fast step met a distribution of another type than the validated step recorded."""


class M2Loss:
    r"""The labelled, classification and unlabelled terms of M2's step loss, each Pyro's.

    .. math:: -\mathcal{U}(x) = -\textstyle\sum_{n,k} q_\phi(k \mid x_n)\,\big[\log p(x_n, k,
        z_{nk}) - \log q_\phi(k \mid x_n) - \log q(z_{nk} \mid x_n, k)\big]

    See the module docstring for what is computed, when the fast path is used and how exactly
    it equals Pyro's ELBOs; otherwise each call is the estimator's ``differentiable_loss``.

    Args:
        model: the :class:`~ppl_vae.ssl.SSVAE`.
        labelled_elbo: the estimator of the labelled bound.
        unlabelled_elbo: the estimator of the unlabelled bound.
        class_elbo: the estimator of the classification term.
        validate: keep Pyro's validation on in the fast steps.

    Attributes:
        fast: use the fast path where it applies (``False``: every call is Pyro's).
        state: per term, whether its fast path is on (``None`` until its first call decides).
        reason: per term, why its fast path is off (empty while on or undecided).
        steps: how many term evaluations took each path, ``{"fast": n, "pyro": m}``.

    Example:
        >>> trace, enum = make_elbo("trace"), make_elbo("enum")  # doctest: +SKIP
        >>> loss = M2Loss(model, trace, enum, trace)  # doctest: +SKIP
        >>> loss.unlabelled(x_u).backward()  # the first call: Pyro's, validated  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        labelled_elbo: Any,
        unlabelled_elbo: Any,
        class_elbo: Any,
        *,
        validate: bool = False,
    ) -> None:
        self.model = model
        self.elbos = {
            "labelled": labelled_elbo,
            "classification": class_elbo,
            "unlabelled": unlabelled_elbo,
        }
        self.validate = validate
        self.fast = True
        self.state: dict[str, bool | None] = dict.fromkeys(TERMS)
        self.reason = dict.fromkeys(TERMS, "")
        self.steps = {"fast": 0, "pyro": 0}
        # Per term: the distribution types of its sites in the validated Pyro step.
        self._types: dict[str, dict[str, type]] = {}
        pair = _is_engine_pair(model)
        # SSVAE.p_z, against which model.p_z is checked at each step (an instance may set its
        # own later): while it is the engine's, p(z) is scored by the prior's log_density.
        self._engine_p_z = None if pair else _engine_p_z()
        for term, elbo in self.elbos.items():
            kind = served_estimator(elbo)
            why = pair
            if kind is None:
                why = f"estimator {type(elbo).__name__} (num_particles={elbo.num_particles})"
            elif kind == "enum" and term != "unlabelled":
                why = "TraceEnum_ELBO serves only the unlabelled term"
            if why:
                self.state[term], self.reason[term] = False, f"not served: {why}"

    # -- the public terms --------------------------------------------------------------------
    def labelled(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``labelled_elbo.differentiable_loss(model.model, model.guide, x, y)``."""
        return self._term("labelled", (x, y), self._labelled)

    def classification(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """``class_elbo.differentiable_loss(model.classifier_model, model.classifier_guide,
        x, y, scale)``."""
        return self._term("classification", (x, y, scale), self._classification)

    def unlabelled(self, x: torch.Tensor) -> torch.Tensor:
        """``unlabelled_elbo.differentiable_loss(model.model, model.guide, x)``."""
        fast = self._enumerated if served_estimator(self.elbos["unlabelled"]) == "enum" else None
        return self._term("unlabelled", (x,), fast or self._relaxed)

    # -- dispatch ----------------------------------------------------------------------------
    def _programs(self, term: str) -> tuple[Callable, Callable]:
        m = self.model
        if term == "classification":
            return m.classifier_model, m.classifier_guide
        return m.model, m.guide

    def _pyro(self, term: str, args: tuple) -> torch.Tensor:
        self.steps["pyro"] += 1
        return self.elbos[term].differentiable_loss(*self._programs(term), *args)

    def _term(self, term: str, args: tuple, fast: Callable[..., torch.Tensor]) -> torch.Tensor:
        state = self.state[term]
        if not self.fast or state is False:
            return self._pyro(term, args)
        device = args[0].device
        rng = _torch_rng_state(device)
        if state is None:
            probed = self._probe(term, args)
            if not self.state[term]:
                return probed
            # Served: the value returned is the fast path's, from the random state the probe
            # started from, so that every step of a run is computed the same way (a resumed
            # run probes again and must take the same step as the uninterrupted one).
            _set_torch_rng_state(rng, device)
        try:
            if self.validate:
                loss = fast(*args)
            else:
                with pyro.validation_enabled(False):
                    loss = fast(*args)
        except _Fallback:  # a site's type is checked where it is built, maybe after a draw:
            _set_torch_rng_state(rng, device)  # rewound, so that the step is Pyro's own
            return self._pyro(term, args)
        self.steps["fast"] += 1
        return loss

    def _probe(self, term: str, args: tuple) -> torch.Tensor:
        """Run Pyro's ELBO on traced programs; switch the term's fast path on if they allow."""
        model, guide = (poutine.trace(p) for p in self._programs(term))
        self.steps["pyro"] += 1
        loss = self.elbos[term].differentiable_loss(model, guide, *args)
        model_sites, guide_sites = _sample_sites(model.trace), _sample_sites(guide.trace)
        if term == "classification":
            self.reason[term] = self._check_classification(model_sites, guide_sites, *args)
        else:
            self.reason[term] = self._check_elbo(term, model_sites, guide_sites, *args)
        self.state[term] = not self.reason[term]
        return loss

    # -- the probe's checks ------------------------------------------------------------------
    def _check_classification(
        self, model_sites: list[dict], guide_sites: list[dict], x: torch.Tensor,
        y: torch.Tensor, scale: float,
    ) -> str:  # fmt: skip
        if guide_sites:
            return f"the classifier's guide has sample sites {[s['name'] for s in guide_sites]}"
        if not isinstance(scale, Real):
            return f"the classification scale is a {type(scale).__name__}, not a number"
        why = _check_sites(
            "classifier model", model_sites, ["y_class"], {"y_class"},
            {"y_class": _pyro_scale(float(scale), len(x))},
        )  # fmt: skip
        if why:
            return why
        if model_sites[0]["value"] is not y:
            return "site 'y_class' does not observe the labels passed to the loss"
        self._types["classification"] = {"y_class": _family(model_sites[0]["fn"])}
        return ""

    def _check_elbo(
        self, term: str, model_sites: list[dict], guide_sites: list[dict], x: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> str:  # fmt: skip
        labelled = term == "labelled"
        why = _check_sites(
            "guide", guide_sites, ["z"] if labelled else ["y", "z"], set(), {}
        ) or _check_sites(
            "model", model_sites, ["y", "z", "x"], {"y", "x"} if labelled else {"x"}, {}
        )
        if why:
            return why
        sites = {f"q_{s['name']}": s for s in guide_sites}
        sites.update({f"p_{s['name']}": s for s in model_sites})
        if sites["p_x"]["value"] is not x:
            return "site 'x' does not observe the data passed to the loss"
        why = _reparameterised("guide", sites["q_z"])
        if not why and not labelled:
            q_y = sites["q_y"]
            if served_estimator(self.elbos[term]) == "enum":
                k = self.model.num_classes
                if q_y["infer"].get("enumerate") != "parallel":
                    why = "guide site 'y' is not enumerated in parallel"
                elif tuple(q_y["value"].shape) != (k, 1, k):
                    why = f"guide site 'y' enumerates values of shape {tuple(q_y['value'].shape)}"
            else:
                why = _reparameterised("guide", q_y)
        if why:
            return why
        # (The model's y and z replay the guide's values, its x is observed: nothing is
        # enumerated in the model.)
        self._types[term] = {
            key: _family(site["fn"]) for key, site in sites.items() if key != "p_x"
        }
        return ""

    def _expect(self, term: str, key: str, d: Any, rsample: bool = False) -> Any:
        """``d`` if it is of the recorded type (and, for a draw, reparameterised), else Pyro."""
        if _family(d) is not self._types[term][key] or (rsample and not d.has_rsample):
            raise _Fallback
        return d

    # -- the fast terms ----------------------------------------------------------------------
    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``SSVAE.one_hot`` without its range check (the labels were checked before training)."""
        return F.one_hot(y.long(), self.model.num_classes).to(like.dtype)

    def _classification(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        r""":math:`-s \sum_n \log q_\phi(y_n \mid x_n)`; for the engine's ``LabelGuide.dist``,
        ``Categorical(logits=guide(x))``, that is the cross-entropy of the logits, one kernel
        (``log_softmax`` and the pick of the label's entry) where ``Categorical`` normalises the
        logits with ``logsumexp`` and then gathers."""
        guide, s = self.model.label_guide, _pyro_scale(float(scale), len(x))
        if _uses_engine_method(guide, "dist", LabelGuide):
            return F.cross_entropy(guide(x), y.long(), reduction="sum") * s
        d = self._expect("classification", "y_class", guide.dist(x))
        return -_points(d.log_prob(y), (len(x),)).sum() * s

    def _log_p_z(self, term: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(z)` (:math:`\log p(z \mid y)` for a label-conditional prior) at the
        draws: the prior's :meth:`~ppl_vae.models.priors.base.Prior.log_density` where
        ``SSVAE.p_z`` is the engine's (``prior(y)`` or ``prior()``, the distribution whose
        ``log_prob`` that is), else the type-checked ``model.p_z(y)``'s ``log_prob``."""
        m = self.model
        if type(m).p_z is self._engine_p_z and "p_z" not in vars(m):
            prior = m.prior
            return prior.log_density(z, y) if prior.label_conditional else prior.log_density(z)
        return self._expect(term, "p_z", m.p_z(y)).log_prob(z)

    def _bound(
        self, term: str, x: torch.Tensor, y: torch.Tensor, q_z: Any, shape: tuple[int, ...]
    ) -> torch.Tensor:
        r""":math:`\log p(y) + \log p(z) + \log p(x \mid z, y) - \log q(z \mid x, y)` per point
        (``shape``: ``(N,)``, or ``(K, N)`` enumerated) at one draw of ``q_z``, with the
        model's p(y) (type-checked), p(z) and decoder as ``SSVAE.model`` builds them
        (unexpanded: their log-densities broadcast over the data plate)."""
        m = self.model
        z = q_z.rsample()
        p_y = self._expect(term, "p_y", m.label_guide.prior(m.class_logits))
        log_pz = self._log_p_z(term, z, y)
        log_px = _log_prob_points(m.likelihood, m.decoder(m.prior.embed(z), y), x)
        log_w = log_px + log_pz - q_z.log_prob(z) + p_y.log_prob(y)
        return _points(log_w, shape)

    def _labelled(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y1 = self._one_hot(y, x)
        q_z = self._expect("labelled", "q_z", self.model.q_z(x, y1), rsample=True)
        return -self._bound("labelled", x, y1, q_z, (len(x),)).sum()

    def _relaxed(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        q_y = self._expect("unlabelled", "q_y", m.label_guide.guide_dist(x), rsample=True)
        y = q_y.rsample()
        q_z = self._expect("unlabelled", "q_z", m.q_z(x, y), rsample=True)
        log_w = self._bound("unlabelled", x, y, q_z, (len(x),)) - q_y.log_prob(y)
        return -log_w.sum()

    def _enumerated(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.model, len(x)
        q_y = self._expect("unlabelled", "q_y", m.label_guide.guide_dist(x))
        y = q_y.enumerate_support(expand=False)  # (K, 1, K): every class
        k = y.shape[0]
        q_z = self._expect("unlabelled", "q_z", m.q_z(x, y), rsample=True)  # batch (K, N)
        log_q = _points(q_y.log_prob(y), (k, n))
        # The exact expectation over y: q(k | x_n) times each class's cost, one fused sum.
        return -(log_q.exp() * (self._bound("unlabelled", x, y, q_z, (k, n)) - log_q)).sum()


def _points(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` if it has the plate's ``shape``, else the step goes to Pyro (a distribution whose
    batch shape does not broadcast to the data plate as Pyro's plate would expand it)."""
    if t.shape != shape:
        raise _Fallback
    return t
