r"""M2's fast step loss equals Pyro's ELBOs: same value, same gradients, same fall-backs.

For each label guide the fast path serves (``enumerate`` under ``TraceEnum_ELBO``, ``relaxed``
under ``Trace_ELBO``), every shipped prior M2 takes (all but the VampPrior, which needs an
encoder of x alone) and every shipped likelihood, each term of
:class:`~ppl_vae.inference.m2_fastpath.M2Loss` (labelled bound, classification term,
unlabelled bound) is evaluated twice from the same parameters and the same seed
(``pyro.set_rng_seed``, so both draw the same :math:`z` and relaxed :math:`y`): once by the fast
path, once by the estimator's ``differentiable_loss`` on the model/guide pair.

On a GPU (``pytest --device cuda``) the same two tests run there: the fast path draws from the
CUDA generator and rewinds it on a fall-back.

Tolerance: float rounding. The fast path computes the same estimator from the same draws (the
same random numbers in the same order) but adds the terms in its own order, in one fused sum
per term, where Pyro sums each site, packs the enumerated ones and adds their ``tensordot``s
(and ``Trace_ELBO`` adds the site sums in float64). So the catalogue tests run in float64 and
require values and gradients to agree to ``rtol = atol = 1e-10``: far below any difference an
estimator or a term would make (leaving out one ``log q`` term moves the value by its order of
magnitude), far above float64 rounding of sums of a few dozen terms (about 1e-15 relative).
The remaining tests run in float32, the trainer's precision, to ``rtol = atol = 1e-5``.

The classification term's scale is 1/7 on a batch of 5 points: Pyro's plate multiplies and
divides the site scale by the batch size, which is not exact in floating point for such
numbers, so the test sees whether the fast path scales exactly as Pyro does.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.components import available
from ppl_vae.data import load_data
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.m2_fastpath import TERMS, M2Loss, served_estimator
from ppl_vae.kinds.m2 import M2Kind
from ppl_vae.models.priors.gaussian import GaussianPrior
from ppl_vae.ssl import SSVAE, SSLConfig, build_ssvae

D, K, LATENT, N = 6, 3, 2, 5
SCALE = 1.0 / 7
SEED = 3
GUIDES = {"enumerate": "enum", "relaxed": "trace"}
PRIORS = [p for p in available("prior") if p != "vamp"]  # VampPrior: needs q(z|x) without y
LIKELIHOODS = available("likelihood")


def make_model(guide: str, prior: object = "gaussian", likelihood: str = "bernoulli") -> SSVAE:
    torch.manual_seed(0)
    model = build_ssvae(
        (D,), K, prior=prior, likelihood=likelihood, label_guide=guide, latent_dim=LATENT,
        hidden_dims=(8,), network="mlp", num_levels=17,
    )  # fmt: skip
    with torch.no_grad():  # a classifier far from uniform, so that the y terms matter
        for p in model.label_guide.net.parameters():
            p.mul_(3.0)
    return model


def make_loss(model: SSVAE, guide: str, **kw) -> M2Loss:
    elbo = {"max_plate_nesting": 1}
    return M2Loss(
        model, make_elbo("trace", 1, **elbo), make_elbo(GUIDES[guide], 1, **elbo),
        make_elbo("trace", 1, **elbo), **kw,
    )  # fmt: skip


def batch(likelihood: str = "bernoulli") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if likelihood == "bernoulli":
        x = torch.bernoulli(torch.full((N, D), 0.4), generator=g)
    else:  # values on the 17-level grid of [0, 1] (discretised logistic), fine for the others
        x = torch.randint(0, 17, (N, D), generator=g).float() / 16
    return x, torch.tensor([0, 1, 2, 0, 1])


def term_args(term: str, x: torch.Tensor, y: torch.Tensor) -> tuple:
    return {"labelled": (x, y), "classification": (x, y, SCALE), "unlabelled": (x,)}[term]


def grads(model: SSVAE, loss: torch.Tensor) -> list[torch.Tensor | None]:
    params = [p for p in model.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def fast_and_pyro(loss: M2Loss, term: str, args: tuple, seed: int = SEED):
    """The term's fast value and gradients, then Pyro's, from the same seed."""
    model = loss.model
    pyro.set_rng_seed(seed)
    fast = getattr(loss, term)(*args)
    g_fast = grads(model, fast)
    pyro.set_rng_seed(seed)
    ref = loss.elbos[term].differentiable_loss(*loss._programs(term), *args)
    return fast, g_fast, ref, grads(model, ref)


def assert_same(fast, g_fast, ref, g_ref) -> None:
    """Values and gradients equal up to float rounding (None where Pyro's is None): 1e-10 in
    float64, 1e-5 in float32 (see the module docstring)."""
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    tol = 1e-10 if fast.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fast.detach(), ref.detach(), rtol=tol, atol=tol)
    assert len(g_fast) == len(g_ref)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("guide", list(GUIDES))
@pytest.mark.parametrize("prior", PRIORS)
def test_every_term_equals_pyro_for_every_prior(guide: str, prior: str, device) -> None:
    model = make_model(guide, prior).to(device, torch.float64)
    loss = make_loss(model, guide)
    x, y = batch()
    x, y = x.to(device, torch.float64), y.to(device)
    for term in TERMS:
        args = term_args(term, x, y)
        getattr(loss, term)(*args)  # the validated Pyro step decides
        assert loss.state[term] is True, loss.reason[term]
        before = dict(loss.steps)
        out = fast_and_pyro(loss, term, args)
        assert loss.steps["fast"] == before["fast"] + 1
        assert_same(*out)


@pytest.mark.parametrize("guide", list(GUIDES))
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", ["gaussian", "von-mises"])
def test_every_term_equals_pyro_for_every_likelihood(guide, likelihood, prior, device) -> None:
    model = make_model(guide, prior, likelihood).to(device, torch.float64)
    loss = make_loss(model, guide)
    x, y = batch(likelihood)
    x, y = x.to(device, torch.float64), y.to(device)
    for term in TERMS:
        args = term_args(term, x, y)
        getattr(loss, term)(*args)
        assert loss.state[term] is True, loss.reason[term]
        out = fast_and_pyro(loss, term, args)
        assert_same(*out)


@pytest.mark.parametrize("guide", list(GUIDES))
def test_one_point_and_validation_kept_on(guide: str) -> None:
    """A batch of one point (Pyro's packing drops the plate's dimension) and ``validate=True``."""
    model = make_model(guide)
    x, _ = batch()
    for validate in (False, True):
        loss = make_loss(model, guide, validate=validate)
        loss.unlabelled(x[:1])
        assert loss.state["unlabelled"] is True
        out = fast_and_pyro(loss, "unlabelled", (x[:1],))
        assert_same(*out)


def test_marginals_that_underflow_to_zero() -> None:
    """Logits 100x larger: some q(k|x) are exactly 0 in float32, which Dice masks out."""
    model = make_model("enumerate")
    with torch.no_grad():
        for p in model.label_guide.net.parameters():
            p.mul_(100.0)
    x, _ = batch()
    assert bool((model.label_guide(x).softmax(-1) == 0).any())
    loss = make_loss(model, "enumerate")
    loss.unlabelled(x)
    fast, g_fast, ref, g_ref = fast_and_pyro(loss, "unlabelled", (x,))
    assert_same(fast, g_fast, ref, g_ref)  # no NaN from 0 * log 0: the terms are finite


@pytest.mark.parametrize("guide", list(GUIDES))
def test_the_kind_step_equals_pyro_and_uses_the_fast_path(guide: str) -> None:
    r""":meth:`M2Kind.loss` (the trainer's step loss) with the fast path and without it."""
    kind = _kind(guide)
    x_l, y_l, x_u = kind.x_l[:4], kind.y_l[:4], kind.x_u[:8]
    pyro.set_rng_seed(0)
    kind.loss(x_l, y_l, x_u, 8, 16)  # the probe
    assert kind.terms.state == dict.fromkeys(TERMS, True), kind.terms.reason
    values = []
    for fast in (True, False):
        kind.fast = fast
        pyro.set_rng_seed(SEED)
        loss = kind.loss(x_l, y_l, x_u, 8, 16)
        values.append((loss, grads(kind.model, loss), kind.parts))
    (a, ga, pa), (b, gb, pb) = values
    assert_same(a, ga, b, gb)
    torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-5)
    assert kind.terms.steps == {"fast": 6, "pyro": 6}  # the probe: Pyro's, then fast


def _kind(guide: str, **cfg) -> M2Kind:
    model = make_model(guide)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(40, D)).astype(np.float32)
    ds = load_data(x, labels=np.arange(40) % K, val_fraction=0.0, test_fraction=0.2, seed=0)
    config = SSLConfig(labels=6, label_guide=guide, num_classes=K, likelihood="bernoulli",
                       latent_dim=LATENT, hidden_dims=[8], device="cpu", **cfg)  # fmt: skip
    splits = (ds.train_x, ds.val_x, ds.test_x)
    n = len(ds.train_x)
    return M2Kind(model, config, ds, splits, np.arange(6), np.arange(6, n), False,
                  torch.device("cpu"))  # fmt: skip


# -- fall-backs --------------------------------------------------------------------------------
def test_served_estimators() -> None:
    assert served_estimator(make_elbo("trace", 1)) == "trace"
    assert served_estimator(make_elbo("enum", 1, max_plate_nesting=1)) == "enum"
    assert served_estimator(make_elbo("trace", 2)) is None  # more than one particle
    for name in ("meanfield", "iwae:3", "tracegraph", "stl", "renyi"):
        assert served_estimator(make_elbo(name, 1)) is None, name


@pytest.mark.parametrize(
    ("guide", "estimator", "num_particles", "pyro_terms"),
    [
        ("relaxed", "iwae:3", 1, {"labelled", "unlabelled"}),  # both bounds take the estimator
        ("relaxed", "stl", 1, {"labelled", "unlabelled"}),
        ("relaxed", None, 2, {"labelled", "unlabelled"}),  # two particles
        ("sample", None, 1, {"labelled", "unlabelled"}),  # score-function guide: TraceGraph
    ],
)
def test_other_estimators_keep_pyro(guide, estimator, num_particles, pyro_terms) -> None:
    kind = _kind(guide, estimator=estimator, num_particles=num_particles)
    terms = kind.terms
    for term in TERMS:
        if term in pyro_terms:
            assert terms.state[term] is False and "not served" in terms.reason[term]
        else:  # the classification term is always Trace_ELBO with one particle
            assert terms.state[term] is None
    x_l, y_l, x_u = kind.x_l[:4], kind.y_l[:4], kind.x_u[:8]
    for _ in range(2):
        kind.loss(x_l, y_l, x_u, 4, 8)
    assert terms.steps == {"fast": 2, "pyro": 2 * len(pyro_terms) + 1}


class _OwnModel(SSVAE):
    def model(self, x, y=None):  # the same program, redefined
        return super().model(x, y)


def test_a_subclass_redefining_the_programs_keeps_pyro() -> None:
    model = make_model("enumerate")
    model.__class__ = _OwnModel
    loss = make_loss(model, "enumerate")
    assert set(loss.state.values()) == {False}
    assert "redefines model" in loss.reason["unlabelled"]
    model = make_model("enumerate")
    model.guide = model.guide  # an instance attribute shadows the method
    assert make_loss(model, "enumerate").state["labelled"] is False


class _HyperPrior(GaussianPrior):
    """A Gaussian prior whose scale has a prior of its own: a sample site inside ``forward``."""

    def forward(self) -> dist.Distribution:
        # (called inside the model's data plate: one tau per point)
        tau = pyro.sample("tau", dist.LogNormal(self.loc.new_zeros(()), 0.1)).unsqueeze(-1)
        return dist.Normal(self.loc, self.scale * tau).to_event(1)


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide:UserWarning")
@pytest.mark.parametrize("guide", list(GUIDES))
def test_a_prior_with_sample_sites_of_its_own_keeps_pyro(guide: str) -> None:
    model = make_model(guide, _HyperPrior)
    loss = make_loss(model, guide)
    x, y = batch()
    for term in ("labelled", "unlabelled"):
        for _ in range(2):
            getattr(loss, term)(*term_args(term, x, y))
        assert loss.state[term] is False
        assert "model sample sites are ['y', 'tau', 'z', 'x']" in loss.reason[term]
    assert loss.steps == {"fast": 0, "pyro": 4}


def test_a_distribution_of_another_type_sends_the_step_to_pyro() -> None:
    """After the probe, the relaxed guide in eval mode gives exact one-hot samples
    (``OneHotCategorical``, not the recorded ``GumbelSoftmaxCategorical``): Pyro's step."""
    model = make_model("relaxed")
    loss = make_loss(model, "relaxed")
    x, _ = batch()
    loss.unlabelled(x)
    assert loss.state["unlabelled"] is True
    model.label_guide.eval()
    pyro.set_rng_seed(SEED)
    value = loss.unlabelled(x)
    assert loss.steps == {"fast": 1, "pyro": 2}
    pyro.set_rng_seed(SEED)
    ref = loss.elbos["unlabelled"].differentiable_loss(model.model, model.guide, x)
    assert torch.equal(value, ref)  # Pyro's own step: bitwise
    model.label_guide.train()
    loss.unlabelled(x)
    assert loss.steps == {"fast": 2, "pyro": 2}


@pytest.mark.parametrize("guide", list(GUIDES))
def test_p_z_is_scored_by_the_priors_log_density_unless_p_z_is_redefined(guide: str) -> None:
    """The fast path's :math:`\\log p(z)` is ``prior.log_density`` at the draws (codes ``(N, D)``
    labelled, ``(K, N, D)`` enumerated); an instance that sets its own ``p_z`` after the loss
    was built (a wider normal) is scored by that distribution, and each still equals Pyro's."""
    model = make_model(guide)
    loss = make_loss(model, guide)
    x, y = batch()
    seen: list[tuple[int, ...]] = []
    log_density = model.prior.log_density

    def spy(z: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(z.shape))
        return log_density(z, *labels)

    model.prior.log_density = spy
    for term in ("labelled", "unlabelled"):
        args = term_args(term, x, y)
        getattr(loss, term)(*args)  # the probe
        seen.clear()
        assert_same(*fast_and_pyro(loss, term, args))
        codes = (K, N, LATENT) if term == "unlabelled" and guide == "enumerate" else (N, LATENT)
        assert seen == [codes]
    wide = dist.Normal(torch.zeros(LATENT), torch.full((LATENT,), 2.0)).to_event(1)
    model.p_z = lambda y_val: wide
    for term in ("labelled", "unlabelled"):
        seen.clear()
        before = dict(loss.steps)
        out = fast_and_pyro(loss, term, term_args(term, x, y))
        assert loss.steps["fast"] == before["fast"] + 1 and seen == []
        assert_same(*out)


def test_switched_off_every_term_is_pyros() -> None:
    kind = _kind("enumerate")
    kind.fast = False
    x_l, y_l, x_u = kind.x_l[:4], kind.y_l[:4], kind.x_u[:8]
    for _ in range(2):
        kind.loss(x_l, y_l, x_u, 4, 8)
    assert kind.terms.steps == {"fast": 0, "pyro": 6}
    assert kind.terms.state == dict.fromkeys(TERMS)  # nothing probed


def test_two_points_in_the_enumerated_term() -> None:
    """A batch of two points: Pyro's packed ``(N, K)`` layout keeps both rows (only a plate of
    size 1 is dropped)."""
    model = make_model("enumerate")
    x, _ = batch()
    loss = make_loss(model, "enumerate")
    loss.unlabelled(x[:2])
    assert loss.state["unlabelled"] is True
    assert_same(*fast_and_pyro(loss, "unlabelled", (x[:2],)))


def _detached(d: dist.Distribution) -> dist.Distribution:
    """``d`` of the same type without ``rsample``: ``has_rsample_(False)``, or for q(z | x, y),
    an ``Independent`` whose base (a von Mises of the same location) has no ``rsample`` (Pyro's
    plate cannot switch it off on an ``Independent``)."""
    if isinstance(d, dist.Independent):
        base = d.base_dist
        return dist.VonMises(base.loc, base.scale.pow(-2)).to_event(d.reinterpreted_batch_ndims)
    return d.has_rsample_(False)


@pytest.mark.parametrize(
    ("guide", "site"), [("enumerate", "z"), ("relaxed", "z"), ("relaxed", "y")]
)
def test_a_site_no_longer_reparameterised_sends_the_step_to_pyro(guide: str, site: str) -> None:
    r"""After the probe, ``q(z | x, y)`` (or the relaxed ``q(y | x)``) comes back of the recorded
    type but without ``rsample`` (``has_rsample_(False)``): Pyro's step, whose gradient is the
    score-function one, not the pathwise gradient a fast ``rsample`` would give."""
    model = make_model(guide)
    loss = make_loss(model, guide)
    x, _ = batch()
    loss.unlabelled(x)
    assert loss.state["unlabelled"] is True
    if site == "z":
        q_z = model.q_z
        model.q_z = lambda x, y: _detached(q_z(x, y))
    else:
        guide_dist = model.label_guide.guide_dist
        model.label_guide.guide_dist = lambda x: _detached(guide_dist(x))
    fast, g_fast, ref, g_ref = fast_and_pyro(loss, "unlabelled", (x,))
    assert loss.steps == {"fast": 1, "pyro": 2}  # the probe's fast value, then Pyro's step
    if (guide, site) == ("relaxed", "z"):
        # the relaxed y was drawn before q(z | x, y) was checked: Pyro's step starts from a
        # later RNG state, so only its finiteness (and the path taken) can be compared
        assert torch.isfinite(fast) and all(g is None or bool(g.isfinite().all()) for g in g_fast)
    else:
        assert_same(fast, g_fast, ref, g_ref)


def test_labels_without_the_last_class_reach_the_networks_one_hot_in_the_data_dtype() -> None:
    """A labelled batch with no point of the last class: the fast path's one-hot labels are
    still ``(N, K)`` in x's dtype, as ``SSVAE.one_hot`` makes them for Pyro's programs."""
    model = make_model("enumerate")
    loss = make_loss(model, "enumerate")
    x, _ = batch()
    y = torch.tensor([0, 1, 0, 1, 0])
    loss.labelled(x, y)
    assert loss.state["labelled"] is True
    seen = []
    forward = model.decoder.forward

    def recording(h, y1):
        seen.append((y1.dtype, tuple(y1.shape)))
        return forward(h, y1)

    model.decoder.forward = recording
    out = fast_and_pyro(loss, "labelled", (x, y))
    assert loss.steps["fast"] == 2
    assert seen == [(x.dtype, (N, K))] * 2  # the fast step's, then Pyro's
    assert_same(*out)


def test_a_label_guide_with_its_own_classifier_distribution_is_scored_by_it() -> None:
    """The classification term takes the cross-entropy of the logits only for the engine's
    ``LabelGuide.dist``; a guide redefining ``dist`` (here: logits halved, a temperature) is
    scored by its own distribution, and both equal Pyro's term."""
    for own in (False, True):
        model = make_model("enumerate")
        if own:
            guide = model.label_guide
            guide.dist = lambda x, g=guide: dist.Categorical(logits=0.5 * g(x))
        loss = make_loss(model, "enumerate")
        x, y = batch()
        loss.classification(x, y, SCALE)
        assert loss.state["classification"] is True, loss.reason["classification"]
        out = fast_and_pyro(loss, "classification", (x, y, SCALE))
        assert_same(*out)
        if own:  # and not the engine's: halving the logits changes the value
            ref = -SCALE * dist.Categorical(logits=model.label_guide(x)).log_prob(y).sum()
            assert abs(float(out[0].detach()) - float(ref.detach())) > 1e-3


@pytest.mark.parametrize("guide", list(GUIDES))
def test_the_probe_step_returns_the_fast_value(guide: str) -> None:
    """The first call of a term (Pyro's validated probe) returns what a fast step from the same
    random state returns, bit for bit: a resumed run probes again and must take the same step
    as the uninterrupted run, which is fast by then."""
    x, y = batch()
    for term in TERMS:
        model = make_model(guide)
        loss = make_loss(model, guide)
        args = term_args(term, x, y)
        pyro.set_rng_seed(SEED)
        probed = getattr(loss, term)(*args)
        assert loss.state[term] is True and loss.steps == {"fast": 1, "pyro": 1}
        g_probed = grads(model, probed)
        pyro.set_rng_seed(SEED)
        fast = getattr(loss, term)(*args)
        assert torch.equal(probed.detach(), fast.detach()), term
        for a, b in zip(g_probed, grads(model, fast), strict=True):
            assert (a is None and b is None) or torch.equal(a, b)
