r"""Mutation-testing kills for :mod:`ppl_vae.inference.m2_fastpath` and
:mod:`ppl_vae.inference.scoring` (``_closed_form_kl``).

The fast path's probe checks are exercised on the sites of a real Pyro step (traced as
:meth:`M2Loss._probe` traces them), each altered in one way; the reasons are compared in full.
Fall-backs are checked by the ``steps`` counters and against Pyro's own ``differentiable_loss``.
The stripped KL path is compared with the closed-form Gaussian KL (tolerance 1e-6 relative:
float32 rounding of a handful of operations).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution

from ppl_vae.inference import m2_fastpath as fp
from ppl_vae.inference.scoring import _closed_form_kl
from tests.test_m2_fastpath import (
    SEED,
    assert_same,
    batch,
    fast_and_pyro,
    make_loss,
    make_model,
)

N, D, K = 5, 6, 3


# -- helpers of the fast path ------------------------------------------------------------------
def test_points_keeps_the_plate_shape_and_sends_any_other_to_pyro() -> None:
    t = torch.zeros(K, N)
    assert fp._points(t, (K, N)) is t
    for shape in [(N,), (K, 1), (1, K, N), (K, N, 1)]:
        with pytest.raises(fp._Fallback):
            fp._points(torch.zeros(shape), (K, N))


def _bernoulli():
    from ppl_vae.models.likelihoods.bernoulli import BernoulliLikelihood

    lik = BernoulliLikelihood((D,))
    calls = []
    forward = lik.forward

    def counted(out):
        calls.append(1)
        return forward(out)

    lik.forward = counted
    return lik, calls


def test_log_prob_points_bernoulli_kernel_and_fallbacks() -> None:
    lik, calls = _bernoulli()
    g = torch.Generator().manual_seed(0)
    out = torch.randn(K, N, 1, D, generator=g)
    x = torch.bernoulli(torch.full((N, D), 0.5), generator=g)
    ref = dist.Bernoulli(logits=out[..., 0, :]).to_event(1).log_prob(x)
    with pyro.validation_enabled(False):
        got = fp._log_prob_points(lik, out, x)
        assert calls == []  # the kernel, not the distribution
        assert torch.equal(got, ref)
        fp._log_prob_points(lik, out, x.double())  # another dtype: the distribution
        assert calls == [1]
    with pyro.validation_enabled(True):
        assert torch.equal(fp._log_prob_points(lik, out, x), ref)
        assert calls == [1, 1]


class _OwnScore(dist.Normal):
    def score_parts(self, x, *args, **kwargs):  # pragma: no cover - never called
        return super().score_parts(x, *args, **kwargs)


def test_entropy_term_is_log_prob_through_wrappers() -> None:
    base = dist.Normal(torch.zeros(N), 1.0)
    assert fp._entropy_term_is_log_prob(base) is True
    masked = MaskedDistribution(base, torch.ones(N, dtype=torch.bool))
    assert fp._entropy_term_is_log_prob(masked) is True
    assert fp._entropy_term_is_log_prob(ExpandedDistribution(base, (2, N))) is True
    assert fp._entropy_term_is_log_prob(_OwnScore(torch.zeros(N), 1.0)) is False
    own = MaskedDistribution(_OwnScore(torch.zeros(N), 1.0), torch.ones(N, dtype=torch.bool))
    assert fp._entropy_term_is_log_prob(own) is False


def test_reparameterised_reasons() -> None:
    def site(fn, **infer):
        return {"name": "z", "fn": fn, "infer": infer}

    normal = dist.Normal(torch.zeros(N), 1.0)
    assert fp._reparameterised("guide", site(normal)) == ""
    assert fp._reparameterised("guide", site(normal, enumerate="parallel")) == (
        "guide site 'z' is enumerated"
    )
    off = dist.Normal(torch.zeros(N), 1.0).has_rsample_(False)
    assert fp._reparameterised("guide", site(off)) == "guide site 'z' (Normal) has no rsample"
    own = _OwnScore(torch.zeros(N), 1.0)
    assert fp._reparameterised("guide", site(own)) == (
        "guide site 'z' (_OwnScore) overrides score_parts"
    )


def test_pyro_scale_and_expect() -> None:
    assert fp._pyro_scale(0.7, 3) == 0.7 * 1.0 * 3 / 3
    loss = make_loss(make_model("relaxed"), "relaxed")
    loss._types["t"] = {"k": dist.Normal}
    normal = dist.Normal(torch.zeros(N), 1.0)
    assert loss._expect("t", "k", normal, rsample=True) is normal
    with pytest.raises(fp._Fallback):
        loss._expect("t", "k", dist.Laplace(torch.zeros(N), 1.0), rsample=True)
    with pytest.raises(fp._Fallback):
        loss._expect("t", "k", dist.Laplace(torch.zeros(N), 1.0))
    with pytest.raises(fp._Fallback):
        loss._expect("t", "k", dist.Normal(torch.zeros(N), 1.0).has_rsample_(False), True)


def test_one_hot_has_every_class_in_the_dtype_asked() -> None:
    loss = make_loss(make_model("enumerate"), "enumerate")
    y1 = loss._one_hot(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.float64))
    assert y1.dtype == torch.float64 and y1.shape == (2, K)


# -- the probe's checks on a real step's sites --------------------------------------------------
def _probed(guide: str, term: str):
    model = make_model(guide)
    loss = make_loss(model, guide)
    x, y = batch()
    args = {"labelled": (x, y), "classification": (x, y, 1.0 / 7), "unlabelled": (x,)}[term]
    m, g = (poutine.trace(p) for p in loss._programs(term))
    loss.elbos[term].differentiable_loss(m, g, *args)
    ms, gs = fp._sample_sites(m.trace), fp._sample_sites(g.trace)
    return loss, [dict(s, infer=dict(s["infer"])) for s in ms], [dict(s) for s in gs], args


def test_check_elbo_reasons_labelled() -> None:
    loss, ms, gs, (x, y) = _probed("enumerate", "labelled")
    assert loss._check_elbo("labelled", ms, gs, x, y) == ""
    assert set(loss._types["labelled"]) == {"q_z", "p_y", "p_z"}
    assert loss._check_elbo("labelled", ms, [], x, y) == "guide sample sites are [], not ['z']"
    assert loss._check_elbo("labelled", ms, gs, x.clone(), y) == (
        "site 'x' does not observe the data passed to the loss"
    )
    gs[0]["fn"] = dist.Normal(torch.zeros(N), 1.0).has_rsample_(False)
    assert loss._check_elbo("labelled", ms, gs, x, y) == "guide site 'z' (Normal) has no rsample"


def test_check_elbo_reasons_enumerated() -> None:
    loss, ms, gs, (x,) = _probed("enumerate", "unlabelled")
    assert loss._check_elbo("unlabelled", ms, gs, x) == ""
    q_y = gs[0]
    q_y["infer"] = {"enumerate": "sequential"}
    assert loss._check_elbo("unlabelled", ms, gs, x) == (
        "guide site 'y' is not enumerated in parallel"
    )
    q_y["infer"] = {"enumerate": "parallel"}
    q_y["value"] = torch.zeros(K, N)
    assert loss._check_elbo("unlabelled", ms, gs, x) == (
        "guide site 'y' enumerates values of shape (3, 5)"
    )


def test_check_elbo_reasons_relaxed() -> None:
    loss, ms, gs, (x,) = _probed("relaxed", "unlabelled")
    assert loss._check_elbo("unlabelled", ms, gs, x) == ""
    gs[0]["fn"] = dist.Normal(torch.zeros(N), 1.0).has_rsample_(False)
    assert loss._check_elbo("unlabelled", ms, gs, x) == "guide site 'y' (Normal) has no rsample"


def test_check_classification_reasons() -> None:
    loss, ms, gs, (x, y, s) = _probed("enumerate", "classification")
    assert loss._check_classification(ms, gs, x, y, s) == ""
    assert loss._check_classification(ms, [{"name": "w"}], x, y, s) == (
        "the classifier's guide has sample sites ['w']"
    )
    assert loss._check_classification(ms, gs, x, y, torch.tensor(s)) == (
        "the classification scale is a Tensor, not a number"
    )
    why = loss._check_classification(ms, gs, x, y, 0.5)
    assert why.startswith("classifier model site 'y_class' has scale "), why
    assert loss._check_classification(ms, gs, x, y.clone(), s) == (
        "site 'y_class' does not observe the labels passed to the loss"
    )


def test_classification_scale_two_equals_pyro() -> None:
    loss = make_loss(make_model("enumerate"), "enumerate")
    x, y = batch()
    loss.classification(x, y, 2.0)
    assert loss.state["classification"] is True, loss.reason["classification"]
    fast, g_fast, ref, g_ref = fast_and_pyro(loss, "classification", (x, y, 2.0))
    assert loss.steps["fast"] == 2
    assert_same(fast, g_fast, ref, g_ref)


def _no_rsample(d: dist.Distribution) -> dist.Distribution:
    if isinstance(d, dist.Independent):
        base = d.base_dist
        return dist.VonMises(base.loc, base.scale.pow(-2)).to_event(d.reinterpreted_batch_ndims)
    return d.has_rsample_(False)


@pytest.mark.parametrize(
    ("guide", "term", "site"),
    [
        ("enumerate", "labelled", "z"),
        ("relaxed", "labelled", "z"),
        ("enumerate", "unlabelled", "z"),
        ("relaxed", "unlabelled", "z"),
        ("relaxed", "unlabelled", "y"),
    ],
)
def test_a_site_without_rsample_goes_to_pyro(guide: str, term: str, site: str) -> None:
    model = make_model(guide)
    loss = make_loss(model, guide)
    x, y = batch()
    args = (x, y) if term == "labelled" else (x,)
    getattr(loss, term)(*args)
    assert loss.state[term] is True
    if site == "z":
        q_z = model.q_z
        model.q_z = lambda x, y: _no_rsample(q_z(x, y))
    else:
        guide_dist = model.label_guide.guide_dist
        model.label_guide.guide_dist = lambda x: _no_rsample(guide_dist(x))
    pyro.set_rng_seed(SEED)
    value = getattr(loss, term)(*args)
    assert loss.steps == {"fast": 1, "pyro": 2}
    # draws the fast path made before it saw the site are undone: the step is Pyro's own
    pyro.set_rng_seed(SEED)
    assert torch.equal(value, loss.elbos[term].differentiable_loss(*loss._programs(term), *args))


# -- scoring: the closed-form KL under Independent / expand -------------------------------------
def _normal_kl(m1, s1, m2, s2):
    return torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def test_closed_form_kl_direct() -> None:
    g = torch.Generator().manual_seed(0)
    m, s = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5
    kl = _closed_form_kl(dist.Normal(m, s), dist.Normal(torch.zeros(3), torch.ones(3)))
    torch.testing.assert_close(kl, _normal_kl(m, s, torch.tensor(0.0), torch.tensor(1.0)))


def test_closed_form_kl_through_independent_and_expand() -> None:
    g = torch.Generator().manual_seed(0)
    m, s = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g) + 0.5
    q = dist.Normal(m, s).to_event(1)
    p = ExpandedDistribution(dist.Normal(torch.ones(3), 2.0).to_event(1), (4,))
    kl = _closed_form_kl(q, p)
    want = _normal_kl(m, s, torch.tensor(1.0), torch.tensor(2.0)).sum(-1)
    assert kl is not None and kl.shape == (4,)
    torch.testing.assert_close(kl, want, rtol=1e-6, atol=1e-6)
    # no Independent: nothing to sum (extra == 0), the base KL broadcast to q's batch shape
    q0 = ExpandedDistribution(dist.Normal(torch.zeros(1), 2.0), (4,))
    p0 = ExpandedDistribution(dist.Normal(torch.ones(1), 1.0), (4,))
    kl0 = _closed_form_kl(q0, p0)
    assert kl0 is not None and kl0.shape == (4,)
    want0 = _normal_kl(torch.tensor(0.0), torch.tensor(2.0), torch.tensor(1.0), torch.tensor(1.0))
    torch.testing.assert_close(kl0, want0.expand(4), rtol=1e-6, atol=1e-6)


def test_closed_form_kl_with_one_side_wrapped() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 3, 2, generator=g)
    eye = torch.eye(2)
    # q wrapped (Independent over a vector family), p not: sum over the reinterpreted dim
    q = dist.MultivariateNormal(m, scale_tril=eye).to_event(1)
    p = dist.MultivariateNormal(torch.zeros(4, 3, 2), scale_tril=eye)
    kl = _closed_form_kl(q, p)
    assert kl is not None and kl.shape == (4,)
    torch.testing.assert_close(kl, 0.5 * m.pow(2).sum((-2, -1)), rtol=1e-6, atol=1e-6)
    # p wrapped (expanded), q not: the base KL as it is
    s = torch.rand(4, 3, generator=g) + 0.5
    q1 = dist.Normal(m[..., 0], s)
    p1 = ExpandedDistribution(dist.Normal(torch.ones(3), 2.0), (4, 3))
    kl1 = _closed_form_kl(q1, p1)
    want = _normal_kl(m[..., 0], s, torch.tensor(1.0), torch.tensor(2.0))
    assert kl1 is not None
    torch.testing.assert_close(kl1, want, rtol=1e-6, atol=1e-6)


class _ScalarQ(dist.Normal):
    pass


class _VectorP(dist.Dirichlet):
    pass


def test_closed_form_kl_rejects_event_dims_that_do_not_match() -> None:
    r"""A KL registered between a scalar and a vector family: after stripping ``Independent``
    the event dims differ, so the per-element KL is not the site's: no closed form."""
    from torch.distributions.kl import register_kl

    register_kl(_ScalarQ, _VectorP)(lambda q, p: torch.zeros(q.batch_shape))
    q = _ScalarQ(torch.zeros(4, 3), 1.0).to_event(1)
    p = _VectorP(torch.ones(4, 3))
    assert _closed_form_kl(q, p) is None


# -- scoring: per-point terms ------------------------------------------------------------------
class _Pair(torch.nn.Module):
    r"""z ~ N(0, 1) per point with q(z|x) = N(1, 2) (KL = 2 - log 2), an observation
    x ~ N(0, 1) that ignores z (recon = log N(x; 0, 1) exactly), and a latent ``w`` of the
    model alone whose shapes are recorded; options add a mask, a guide-only site, a global latent
    drawn first, or a site with a batch dim too many."""

    def __init__(self, mask=None, extra=False, glob=False, deep=""):
        super().__init__()
        self.mask = True if mask is None else mask
        self.extra, self.glob, self.deep = extra, glob, deep
        self.seen: list[tuple[int, ...]] = []

    def _shape(self, name: str, n: int) -> tuple[int, ...]:
        return (3, 1, n) if self.deep == name else (n,)

    def guide(self, x):
        n = x.shape[0]
        if self.glob:
            pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", n, dim=-1):
            with poutine.mask(mask=self.mask):
                pyro.sample("z", dist.Normal(x.new_ones(self._shape("z", n)), 2.0))
            if self.extra:
                pyro.sample("aux", dist.Normal(x.new_zeros(n), 1.0))

    def model(self, x):
        n = x.shape[0]
        if self.glob:
            pyro.sample("g", dist.Normal(x.new_zeros(()), 2.0))
        with pyro.plate("data", n, dim=-1):
            with poutine.mask(mask=self.mask):
                pyro.sample("z", dist.Normal(x.new_zeros(self._shape("z", n)), 1.0))
            w = pyro.sample("w", dist.Normal(x.new_zeros(n), 1.0))
            self.seen.append(tuple(w.shape))
            with poutine.mask(mask=self.mask):
                pyro.sample("x", dist.Normal(x.new_zeros(self._shape("x", n)), 1.0), obs=x)


_KL_Z = 2.0 - torch.log(torch.tensor(2.0))


def _x(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0))


def test_per_point_terms_chunks_values_and_progress(monkeypatch) -> None:
    from ppl_vae.inference import scoring

    bars = []

    class _Bar:
        def update(self, n):
            bars.append(n)

    from contextlib import contextmanager

    @contextmanager
    def recording(*args):
        bars.append(args)
        yield _Bar()

    monkeypatch.setattr(scoring, "progress_bar", recording)
    pair, x = _Pair(), _x(5)
    terms = scoring.per_point_terms(pair, x, num_samples=3, plan=scoring.ChunkPlan(2, 4))
    assert bars == [(False, 15, "terms"), 8, 4, 2, 1]
    assert pair.seen == [(2, 4), (1, 4), (2, 1), (1, 1)]  # w: one draw per particle
    assert terms.num_samples == 3
    torch.testing.assert_close(terms.recon, dist.Normal(0.0, 1.0).log_prob(x))
    assert set(terms.kl) == {"z"} and terms.analytic == {"z": True}
    torch.testing.assert_close(terms.kl["z"], _KL_Z.expand(5))


def test_per_point_terms_default_plan_and_samples(monkeypatch) -> None:
    from ppl_vae.inference import scoring

    calls = []
    chunk = scoring._chunk_terms

    def recording(module, xb, k):
        calls.append((xb.shape[0], k))
        return chunk(module, xb, k)

    monkeypatch.setattr(scoring, "_chunk_terms", recording)
    assert scoring.per_point_terms(_Pair(), _x(1)).num_samples == 100
    assert calls == [(1, 100)]
    calls.clear()
    scoring.per_point_terms(_Pair(), _x(513), num_samples=101)
    assert calls == [(512, 100), (512, 1), (1, 100), (1, 1)]
    from ppl_vae.models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^`num_samples` must be positive, got 0$"):
        scoring.per_point_terms(_Pair(), _x(2), num_samples=0)


def test_per_point_terms_masks_and_skips() -> None:
    from ppl_vae.inference.scoring import per_point_terms

    keep = torch.tensor([True, False, True, False, True])
    x = _x(5)
    terms = per_point_terms(_Pair(mask=keep), x, num_samples=2)
    want = torch.where(keep, dist.Normal(0.0, 1.0).log_prob(x), 0.0)
    torch.testing.assert_close(terms.recon, want)
    torch.testing.assert_close(terms.kl["z"], torch.where(keep, _KL_Z, 0.0))
    # a guide-only site and a global latent drawn first: no per-point KL for either
    terms = per_point_terms(_Pair(extra=True, glob=True), x, num_samples=2)
    assert set(terms.kl) == {"z"}


@pytest.mark.parametrize("site", ["x", "z"])
def test_per_point_terms_name_a_site_with_a_batch_dim_too_many(site: str) -> None:
    from ppl_vae.inference.scoring import _per_point, per_point_terms
    from ppl_vae.models.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^site '{site}' has batch shape \(3, 2, 5\)"):
        per_point_terms(_Pair(deep=site), _x(5), num_samples=2)
    message = (
        "site 'x' has batch shape (2, 2, 5); per-point terms need its batch dims to be "
        "pyro.plate('data') at dim -1 only (declare the rest with to_event)"
    )
    with pytest.raises(ConfigError) as err:
        _per_point(torch.zeros(2, 2, 5), 2, 5, {"name": "x"})
    assert str(err.value) == message


def test_an_expanded_site_whose_base_type_changes_goes_to_pyro() -> None:
    """p(z) wrapped by Pyro's ``ExpandedDistribution`` (as for a class without ``expand``): the
    probe records the base's type, so a later step whose wrapped base is of another type (a
    diagonal ``MultivariateNormal`` for the recorded ``Independent`` Normal: the same density)
    is Pyro's, and the step after it with the recorded type is fast again."""
    model = make_model("enumerate")
    loss = make_loss(model, "enumerate")
    x, y = batch()
    loc, scale = torch.zeros(2), torch.full((2,), 1.5)
    base = {"d": lambda: dist.Normal(loc, scale).to_event(1)}
    model.p_z = lambda y_val: ExpandedDistribution(base["d"](), (1,))
    loss.labelled(x, y)  # the probe: Pyro's step
    loss.labelled(x, y)
    assert loss.state["labelled"] is True and loss.steps == {"fast": 2, "pyro": 1}
    base["d"] = lambda: dist.MultivariateNormal(loc, scale_tril=torch.diag(scale))
    pyro.set_rng_seed(SEED)
    value = loss.labelled(x, y)
    assert loss.steps == {"fast": 2, "pyro": 2}
    pyro.set_rng_seed(SEED)
    ref = loss.elbos["labelled"].differentiable_loss(*loss._programs("labelled"), x, y)
    assert torch.equal(value, ref)
    base["d"] = lambda: dist.Normal(loc, scale).to_event(1)
    loss.labelled(x, y)
    assert loss.steps == {"fast": 3, "pyro": 2}
