r"""Estimator plumbing (``ppl_vae.inference.estimators``) that mutation testing found unchecked.

The objectives are checked on a conjugate pair at its exact posterior, where every bound is
:math:`\log p(x)` with zero variance, so values are compared with a closed form to float
precision:

.. math::
    z \sim \mathcal{N}(0, I_D),\; x \mid z \sim \mathcal{N}(z, s^2 I_D),\;
    q(z \mid x) = p(z \mid x) = \mathcal{N}\big(\tfrac{x}{1+s^2}, \tfrac{s^2}{1+s^2}\big),\;
    \log p(x) = \log \mathcal{N}(x; 0, (1+s^2) I_D).

The options of :func:`make_elbo` (particles, vectorisation, plate nesting, Pyro options) are
checked against its docstring, once through ``make_elbo`` and once through the registry's
builders called inside the test: the registry is built at import, and mutmut forks its test
processes after the import, so only a builder called by a test is seen mutated there.
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from ppl_vae import ConfigError
from ppl_vae.inference import estimators
from ppl_vae.inference.estimators import (
    IWAE_ELBO,
    DifferentiableRenyi_ELBO,
    DifferentiableTraceGraph_ELBO,
    MeanField_ELBO,
    TraceDReG_ELBO,
    TraceSTL_ELBO,
    estimator_names,
    log_likelihood,
    make_elbo,
    parse_estimator,
)

X = torch.tensor([[0.5, -1.0], [1.5, 0.3], [-0.7, 2.0]])  # (N = 3, D = 2)
NOISE = 0.5  # s


def _model(x, *, noise):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, noise).to_event(1), obs=x)


def _posterior(x, noise, loc_factor=1.0):
    var = noise**2 / (1 + noise**2)
    return dist.Normal(loc_factor * x / (1 + noise**2), math.sqrt(var)).to_event(1)


def _guide(x, *, noise):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", _posterior(x, noise))


def _log_evidence(x, noise):
    """sum_n log N(x_n; 0, (1 + s^2) I)."""
    var = 1 + noise**2
    return float((-0.5 * x**2 / var - 0.5 * math.log(2 * math.pi * var)).sum())


# --------------------------------------------------------------------------- loss_and_grads


@pytest.mark.parametrize("spec", ["stl", "renyi:0.5", "iwae:3", "dreg:3"])
def test_loss_and_grads_passes_keywords_and_skips_backward_without_parameters(spec):
    """The model's keyword arguments reach it; with no parameter to differentiate (plain tensors)
    the loss is returned without a ``backward`` (which would raise), and at the exact posterior
    it is -log p(x) exactly."""
    elbo = make_elbo(spec, num_particles=2)
    loss = elbo.loss_and_grads(_model, _guide, X, noise=NOISE)
    assert isinstance(loss, float)
    assert loss == pytest.approx(-_log_evidence(X, NOISE), rel=1e-5, abs=1e-5)


def test_loss_and_grads_honours_retain_graph():
    """``retain_graph=True`` (a Pyro ELBO option) keeps the graph: a tensor computed before the
    step, from which the guide's location is made, can be differentiated again afterwards."""
    w = torch.tensor(0.0, requires_grad=True)
    factor = w.exp()  # exp saves its output: freed by a backward that does not retain the graph

    def guide(x, *, noise):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", _posterior(x, noise, loc_factor=factor))

    make_elbo("stl", retain_graph=True).loss_and_grads(_model, guide, X, noise=NOISE)
    grad_of_step = w.grad.clone()
    factor.backward()  # raises "Trying to backward through the graph a second time" if freed
    torch.testing.assert_close(w.grad - grad_of_step, torch.tensor(1.0))  # d exp(w) / dw at 0


def _nan_warnings_from_this_package(run):
    with pyro.validation_enabled(False), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [
        str(w.message)
        for w in caught
        if str(w.message).startswith("Encountered NaN") and w.filename.endswith("estimators.py")
    ]


@pytest.mark.parametrize(
    "step",
    [
        lambda x: make_elbo("stl").loss_and_grads(_model, _guide, x, noise=NOISE),
        lambda x: make_elbo("tracegraph").differentiable_loss(_model, _guide, x, noise=NOISE),
    ],
    ids=["stl loss_and_grads", "tracegraph differentiable_loss"],
)
def test_a_nan_loss_is_reported_as_the_loss(step):
    x = X.clone()
    x[0, 0] = float("nan")
    messages = _nan_warnings_from_this_package(lambda: step(x))
    assert messages and all(m == "Encountered NaN: loss" for m in messages), messages


def test_tracegraph_without_sample_sites_is_a_one_line_error():
    def empty(x):
        pass

    with pytest.raises(ConfigError) as info:
        make_elbo("tracegraph").differentiable_loss(empty, empty, X)
    assert str(info.value) == "the model and guide have no sample sites: nothing to estimate"


# --------------------------------------------------------------------------- make_elbo options

CLASSES = {
    "trace": Trace_ELBO,
    "meanfield": MeanField_ELBO,
    "tracegraph": DifferentiableTraceGraph_ELBO,
    "enum": TraceEnum_ELBO,
    "stl": TraceSTL_ELBO,
    "renyi": DifferentiableRenyi_ELBO,
    "iwae": IWAE_ELBO,
    "dreg": TraceDReG_ELBO,
}
PLAIN = ["trace", "meanfield", "tracegraph", "enum", "stl"]
WEIGHTED = ["iwae", "dreg"]


def _via_builders_now(spec, num_particles=1, vectorize_particles=None, max_plate_nesting=1, **kw):
    """What ``make_elbo`` does, with the registry's builder made inside the test."""
    name, arg = parse_estimator(spec)
    if name in PLAIN:
        build = estimators._build_plain(CLASSES[name])
    elif name in WEIGHTED:
        build = estimators._build_weighted(CLASSES[name])
    else:
        build = estimators._build_renyi
    return build(arg, num_particles, vectorize_particles, max_plate_nesting, kw)


@pytest.fixture(params=["make_elbo", "builders called now"])
def build(request):
    return make_elbo if request.param == "make_elbo" else _via_builders_now


def test_every_estimator_is_its_class():
    assert sorted(CLASSES) == estimator_names()
    for name, cls in CLASSES.items():
        assert type(make_elbo(name)) is cls


@pytest.mark.parametrize("name", PLAIN)
def test_a_plain_estimator_vectorises_several_particles_by_default(build, name):
    one = build(name)
    assert one.num_particles == 1 and one.vectorize_particles is False
    assert one.max_plate_nesting == 1
    two = build(name, num_particles=2)
    assert two.num_particles == 2 and two.vectorize_particles is True
    assert build(name, num_particles=2, vectorize_particles=False).vectorize_particles is False
    assert build(name, num_particles=1, vectorize_particles=True).vectorize_particles is True
    assert build(name, max_plate_nesting=3).max_plate_nesting == 3
    assert build(name, strict_enumeration_warning=False).strict_enumeration_warning is False


@pytest.mark.parametrize("name", WEIGHTED)
def test_an_importance_weighted_estimator_takes_k_from_the_spec_then_num_particles(build, name):
    default = build(name)
    assert default.num_particles == 5 and default.vectorize_particles is True
    assert default.max_plate_nesting == 2  # the data plate and, to its left, the particles
    assert build(name, num_particles=2).num_particles == 2
    assert build(name, num_particles=4).num_particles == 4
    assert build(f"{name}:3", num_particles=2).num_particles == 3
    assert build(f"{name}:3").num_particles == 3
    sequential = build(name, vectorize_particles=False, max_plate_nesting=3)
    assert sequential.vectorize_particles is False and sequential.max_plate_nesting == 3
    assert build(name, strict_enumeration_warning=False).strict_enumeration_warning is False


def test_renyi_takes_alpha_from_the_spec_and_passes_pyro_options(build):
    assert build("renyi").alpha == 0.5
    assert build("renyi:0.2").alpha == 0.2
    assert build("renyi:-1").alpha == -1.0
    assert build("renyi", strict_enumeration_warning=False).strict_enumeration_warning is False


def test_renyi_alpha_reaches_the_value():
    r"""With fixed draws the K-particle bound is :math:`\frac{1}{1-\alpha}\log\frac1K\sum_k
    w_k^{1-\alpha}`, summed over data points: the hand computation from the same draws."""
    loc_factor = 0.3  # away from the posterior, so the bound depends on alpha

    def guide(x, *, noise):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", _posterior(x, noise, loc_factor))

    k, alpha = 4, 0.2
    pyro.set_rng_seed(3)
    loss = make_elbo(f"renyi:{alpha}", num_particles=k).differentiable_loss(
        _model, guide, X, noise=NOISE
    )
    pyro.set_rng_seed(3)
    q = _posterior(X, NOISE, loc_factor)
    z = q.base_dist.expand((k, *X.shape)).rsample()  # the particle plate, as the guide draws
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(z, NOISE).log_prob(X).sum(-1)
        - q.base_dist.log_prob(z).sum(-1)
    )  # (K, N)
    bound = (torch.logsumexp((1 - alpha) * log_w, 0) - math.log(k)) / (1 - alpha)
    torch.testing.assert_close(loss, -bound.sum(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- log_likelihood


def test_log_likelihood_defaults_to_1000_samples_in_chunks_of_100():
    """The documented defaults, and at the exact posterior the estimate is log p(x) exactly."""
    particles = []

    def guide(x, *, noise):
        with pyro.plate("data", x.shape[0]):
            particles.append(pyro.sample("z", _posterior(x, noise)).shape[0])

    estimate = log_likelihood(_model, guide, X, noise=NOISE)
    assert particles == [100] * 10
    var = 1 + NOISE**2
    exact = (-0.5 * X**2 / var - 0.5 * math.log(2 * math.pi * var)).sum(-1)
    torch.testing.assert_close(estimate, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [True, False, 1.5, "1", None])
def test_log_likelihood_rejects_a_max_plate_nesting_that_is_not_a_positive_integer(bad):
    with pytest.raises(ConfigError) as info:
        log_likelihood(_model, _guide, X, noise=NOISE, num_samples=2, max_plate_nesting=bad)
    message = str(info.value)
    assert "`max_plate_nesting` must be a positive integer" in message
    assert f"got {bad!r}" in message and len(message.splitlines()) == 1


# --------------------------------------------------------------------------- STL and DReG


@pytest.mark.parametrize("spec", ["stl", "dreg:3"])
def test_a_guide_site_without_rsample_is_a_one_line_error_naming_the_estimator(spec):
    def guide(x, *, noise):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(torch.full_like(x, 0.5)).to_event(1))

    with pytest.raises(ConfigError) as info:
        make_elbo(spec).differentiable_loss(_model, guide, X, noise=NOISE)
    name = spec.partition(":")[0]
    assert str(info.value) == (
        f"estimator '{name}' needs reparameterisable guide sites, but site 'z' (Independent) "
        "has no rsample; use 'trace' or 'tracegraph' for score-function gradients"
    )


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorised", "sequential"])
@pytest.mark.parametrize("k", [2, 3])
def test_iwae_and_dreg_values_are_log_p_x_at_the_exact_posterior(k, vectorize):
    """Every importance weight is p(x), so the K-particle bound is log p(x) whatever K, with or
    without vectorised particles (the dreg value also under torch.no_grad, as in evaluation)."""
    exact = -_log_evidence(X, NOISE)
    for spec in (f"iwae:{k}", f"dreg:{k}"):
        elbo = make_elbo(spec, vectorize_particles=vectorize)
        loss = elbo.differentiable_loss(_model, _guide, X, noise=NOISE)
        assert float(loss) == pytest.approx(exact, rel=1e-5, abs=1e-5), spec
        with torch.no_grad():
            loss = elbo.differentiable_loss(_model, _guide, X, noise=NOISE)
        assert float(loss) == pytest.approx(exact, rel=1e-5, abs=1e-5), spec


FEATURE_LOC = torch.tensor([0.3, -0.5, 0.8])  # q(z_n) = N(c_n, 0.7^2), away from the posterior


def _feature_model(xt):
    """One scalar z per point (data plate, dim -1), x_dn ~ N(z_n, s^2) in a features plate at
    dim -2 that z is not in: the features must be summed before the particles are combined."""
    with pyro.plate("data", xt.shape[1], dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features", xt.shape[0], dim=-2):
            pyro.sample("x", dist.Normal(z, NOISE), obs=xt)


def _feature_guide(loc):
    def guide(xt):
        with pyro.plate("data", xt.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(loc, 0.7))

    return guide


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorised", "sequential"])
def test_dreg_sums_a_plate_that_not_every_site_is_in(vectorize):
    xt = X.T  # (D = 2, N = 3)
    loc = FEATURE_LOC.clone().requires_grad_()  # a gradient, so the DReG hooks are built
    k = 4
    pyro.set_rng_seed(9)
    elbo = make_elbo(f"dreg:{k}", vectorize_particles=vectorize, max_plate_nesting=2)
    loss = elbo.differentiable_loss(_feature_model, _feature_guide(loc), xt)
    loss.backward()
    assert loc.grad is not None and torch.isfinite(loc.grad).all()
    pyro.set_rng_seed(9)
    q = dist.Normal(FEATURE_LOC, 0.7)
    z = q.expand((k, 1, 3)).rsample() if vectorize else torch.stack([q.rsample() for _ in range(k)])
    z = z.reshape(k, 3)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + dist.Normal(z.unsqueeze(1), NOISE).log_prob(xt).sum(1)  # (K, N): the features summed
        - q.log_prob(z)
    )
    iwae = (torch.logsumexp(log_w, 0) - math.log(k)).sum()
    torch.testing.assert_close(loss.detach(), -iwae, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["dreg:2", "iwae:2"])
def test_a_nan_loss_of_an_importance_weighted_bound_is_reported_as_the_loss(spec):
    x = X.clone()
    x[0, 0] = float("nan")
    messages = _nan_warnings_from_this_package(
        lambda: make_elbo(spec).differentiable_loss(_model, _guide, x, noise=NOISE)
    )
    assert messages and all(m == "Encountered NaN: loss" for m in messages), messages


@pytest.mark.parametrize("spec", ["dreg:2", "iwae:2", "renyi:0.5"])
def test_a_bound_without_sample_sites_is_a_one_line_error(spec):
    def empty(x):
        pass

    with pytest.raises(ConfigError) as info:
        make_elbo(spec).differentiable_loss(empty, empty, X)
    assert str(info.value) == "the model and guide have no sample sites: nothing to estimate"


# --------------------------------------------------------------------------- meanfield warnings


def _scalar_pair(prior, posterior, names=("z",)):
    """Scalar latent sites (no ``to_event``), so the site's types are the families themselves."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            for name in names:
                pyro.sample(name, prior)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            for name in names:
                pyro.sample(name, posterior)

    return model, guide


def _meanfield_warnings(elbo, *pairs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for model, guide in pairs:
            elbo.differentiable_loss(model, guide, X)
    return [str(w.message) for w in caught if "meanfield" in str(w.message)]


def test_meanfield_warns_once_per_site_and_pair_of_types():
    student, cauchy, gumbel = (
        dist.StudentT(3.0, 0.0, 1.0),
        dist.Cauchy(0.0, 1.0),
        dist.Gumbel(0.0, 1.0),
    )
    messages = _meanfield_warnings(
        make_elbo("meanfield"),
        _scalar_pair(student, student),
        _scalar_pair(student, student),  # the same pair again: no second warning
        _scalar_pair(student, cauchy),  # another q at the same site
        _scalar_pair(gumbel, student),  # another p at the same site
        _scalar_pair(student, student, names=("z", "u")),  # a new site after a known one
    )
    assert messages == [
        f"meanfield: no KL is registered for KL({q} || {p}) at site {site!r}; that term is "
        "estimated by Monte Carlo (register one with pyro.distributions.kl.register_kl)"
        for q, p, site in [
            ("StudentT", "StudentT", "z"),
            ("Cauchy", "StudentT", "z"),
            ("StudentT", "Gumbel", "z"),
            ("StudentT", "StudentT", "u"),
        ]
    ]


def test_meanfield_takes_pyros_positional_options():
    assert MeanField_ELBO(3).num_particles == 3


def test_iwae_defaults_are_the_documented_ones():
    """IWAE_ELBO() is the alpha = 0 Rényi bound with K = 5 vectorised particles and no limit on
    plate nesting (its docstring; ``iwae`` without an argument in ``make_elbo`` means K = 5)."""
    e = estimators.IWAE_ELBO()
    assert e.alpha == 0.0
    assert e.num_particles == 5
    assert e.max_plate_nesting == math.inf
    assert e.vectorize_particles is True


def _conjugate_pair(dim: int = -1, subsample: int | None = None, exact: bool = True):
    """z ~ N(0, 1), x | z ~ N(z, 1) in pyro.plate('data', 10); the guide is the exact posterior
    N(x / 2, 1 / 2) (``exact``) or N(0.5, 1)."""

    def model(x):
        with pyro.plate("data", 10, subsample_size=subsample, dim=dim):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 10, subsample_size=subsample, dim=dim):
            loc, scale = (x / 2, math.sqrt(0.5)) if exact else (torch.full_like(x, 0.5), 1.0)
            pyro.sample("z", dist.Normal(loc, scale))

    return model, guide


def _conjugate_log_px(x: torch.Tensor) -> torch.Tensor:
    """log p(x) of the conjugate pair, by hand: x ~ N(0, 2) with z integrated out."""
    return -0.5 * x**2 / 2 - 0.5 * math.log(2 * math.pi * 2)


def test_log_importance_weights_under_the_exact_posterior_are_log_p_x():
    # with q = p(z | x) every weight is p(x) = N(x; 0, 2), whatever z was drawn
    x = torch.linspace(-2.0, 2.0, 10)
    model, guide = _conjugate_pair()
    pyro.set_rng_seed(0)
    lw = estimators.log_importance_weights(model, guide, (x,), {}, 4, 1)
    assert lw.shape == (4, 10)
    torch.testing.assert_close(lw, _conjugate_log_px(x).expand(4, 10), rtol=0, atol=1e-5)


def test_log_importance_weights_refuse_a_subsampled_or_misplaced_data_plate():
    model, guide = _conjugate_pair(subsample=2)
    with pytest.raises(ConfigError) as err:
        estimators.log_importance_weights(model, guide, (torch.zeros(2),), {}, 3, 1)
    assert str(err.value) == (
        "log_likelihood needs the whole batch in pyro.plate('data'), but it is subsampled (2 of "
        "10); pass the batch to evaluate instead"
    )
    model, guide = _conjugate_pair(dim=-3, exact=False)
    with pytest.raises(ConfigError) as err:
        estimators.log_importance_weights(model, guide, (torch.zeros(10, 1, 1),), {}, 3, 1)
    assert str(err.value) == "pyro.plate('data') is at dim -3, outside `max_plate_nesting` = 1"


def test_a_prior_site_left_out_of_the_guide_cancels_and_later_sites_still_count():
    # w is drawn from its prior by the model (not in the guide): its p and q cancel, and the
    # observed x after it still enters, so the weights are still log N(x; 0, 2)
    def model(x):
        with pyro.plate("data", 10, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    _, guide = _conjugate_pair()
    x = torch.linspace(-2.0, 2.0, 10)
    lw = estimators.log_importance_weights(model, guide, (x,), {}, 3, 1)
    torch.testing.assert_close(lw, _conjugate_log_px(x).expand(3, 10), rtol=0, atol=1e-5)


def test_log_importance_weights_refuse_auxiliary_guide_sites_and_unobserved_models():
    model, _ = _conjugate_pair()

    def guide_with_aux(x):
        with pyro.plate("data", 10, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))
            pyro.sample("aux", dist.Normal(0.0, 1.0))

    x = torch.zeros(10)
    with pytest.raises(ConfigError) as err:
        estimators.log_importance_weights(model, guide_with_aux, (x,), {}, 2, 1)
    assert str(err.value) == (
        "guide site 'aux' does not appear in the model; log_likelihood does not support "
        "auxiliary guide variables"
    )

    def prior_only(x):  # nothing observed, and its one latent drawn from the prior
        with pyro.plate("data", 10, dim=-1):
            pyro.sample("w", dist.Normal(0.0, 1.0))

    def empty_guide(x):
        pass

    with pytest.raises(ConfigError) as err:
        estimators.log_importance_weights(prior_only, empty_guide, (x,), {}, 2, 1)
    assert str(err.value) == "the model has no observed sites: there is no likelihood to estimate"


# ------------------------------------------------- log_importance_weights: particles, masks, args


def test_a_model_latent_the_guide_leaves_out_is_drawn_afresh_for_every_particle():
    """u_n ~ N(0, 1) is sampled by the model (the guide is empty), x_n | u_n ~ N(u_n, 1): each
    particle's weight is log N(x_n; u_nk, 1) with its own u_nk, so the weights differ across
    particles, and their log-mean-exp is a Monte Carlo estimate of log N(x_n; 0, 2)."""

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(u, 1.0), obs=x)

    def guide(x):
        pass

    x = torch.linspace(-1.5, 1.5, 10)
    k = 20000
    pyro.set_rng_seed(3)
    lw = estimators.log_importance_weights(model, guide, (x,), {}, k, 1)
    assert lw.shape == (k, 10)
    assert (lw[0] != lw[1]).all()
    estimate = torch.logsumexp(lw, 0) - math.log(k)
    # the relative sd of a weight p(x|u)/p(x) under the prior is 0.39 at x = 0 and 0.82 at
    # |x| = 1.5 (by quadrature); over 20000 draws the log-mean has sd < 0.006, so 0.04 is
    # more than 6 sigma
    torch.testing.assert_close(estimate, _conjugate_log_px(x), rtol=0, atol=0.04)


def test_log_importance_weights_honour_masks_in_the_model_and_the_guide():
    """log w_n = log N(z_n; 0, 1) + m_n log N(x_n; z_n, 1) - g_n log q(z_n | x_n), with the model's
    mask m on x and the guide's mask g on z, computed by hand from the z the guide drew."""
    m = torch.tensor([True, False, True, False, True, True, False, True, False, True])
    g = torch.tensor([True, True, False, False, True, False, True, True, True, False])
    drawn = []

    def model(x):
        with pyro.plate("data", 10, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.mask(mask=m):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 10, dim=-1), poutine.mask(mask=g):
            drawn.append(pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5))))

    x = torch.linspace(-2.0, 2.0, 10)
    lw = estimators.log_importance_weights(model, guide, (x,), {}, 3, 1)
    (z,) = drawn
    z = z.reshape(3, 10)
    by_hand = (
        dist.Normal(0.0, 1.0).log_prob(z)
        + m * dist.Normal(z, 1.0).log_prob(x)
        - g * dist.Normal(x / 2, math.sqrt(0.5)).log_prob(z)
    )
    torch.testing.assert_close(lw, by_hand, rtol=0, atol=1e-5)


class _Shifted(dist.Normal):
    """A Normal whose log density takes extra ``pyro.sample`` arguments: ``log_prob(v, a, b=0)``
    is ``Normal.log_prob(v) - a - b`` (Pyro passes a site's ``args`` and ``kwargs`` on to the
    distribution's call and to its ``log_prob``)."""

    def __call__(self, *args, **kwargs):
        return self.sample()

    def log_prob(self, value, *args, **kwargs):
        return super().log_prob(value) - sum(args) - kwargs.get("b", 0.0)


def test_log_importance_weights_pass_a_sites_args_and_kwargs_to_log_prob():
    def model(x):
        with pyro.plate("data", 10, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", _Shifted(z, 1.0), 0.25, b=0.5, obs=x)

    def guide(x):
        with pyro.plate("data", 10, dim=-1):
            pyro.sample("z", _Shifted(x / 2, math.sqrt(0.5)), 1.0, b=2.0)

    x = torch.linspace(-2.0, 2.0, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lw = estimators.log_importance_weights(model, guide, (x,), {}, 3, 1)
    # the exact-posterior weight log N(x; 0, 2), less the model's 0.25 + 0.5, plus the guide's 3
    expected = _conjugate_log_px(x) - 0.75 + 3.0
    torch.testing.assert_close(lw, expected.expand(3, 10), rtol=0, atol=1e-5)


def test_the_data_plate_may_be_declared_in_the_guide_only():
    """The model puts its points in a plate of another name at the same dim: the guide's
    pyro.plate('data') locates the data dim, and the weights are still log N(x; 0, 2)."""

    def model(x):
        with pyro.plate("points", 10, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    _, guide = _conjugate_pair()
    x = torch.linspace(-2.0, 2.0, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro: a plate in the guide but not the model
        lw = estimators.log_importance_weights(model, guide, (x,), {}, 3, 1)
    torch.testing.assert_close(lw, _conjugate_log_px(x).expand(3, 10), rtol=0, atol=1e-5)


def test_log_importance_weights_with_a_second_plate_level():
    """max_plate_nesting = 2 with the data at dim -1 and a features plate at dim -2 that z is
    not in: the features are summed, and the result is (K, N) = log N(x; 0, 2) per feature."""
    xt = torch.linspace(-2.0, 2.0, 10).reshape(2, 5)  # (features = 2, N = 5)

    def model(xt):
        with pyro.plate("data", 5, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", 2, dim=-2):
                pyro.sample("x", dist.Normal(z, 1.0), obs=xt)

    def guide(xt):  # the exact posterior of z given both features: N(sum x / 3, 1 / 3)
        with pyro.plate("data", 5, dim=-1):
            pyro.sample("z", dist.Normal(xt.sum(0) / 3, math.sqrt(1 / 3)))

    lw = estimators.log_importance_weights(model, guide, (xt,), {}, 4, 2)
    # x_n ~ N(0, I + 11^T) (2 features): the log density by hand
    cov = torch.eye(2) + torch.ones(2, 2)
    by_hand = dist.MultivariateNormal(torch.zeros(2), cov).log_prob(xt.T)
    assert lw.shape == (4, 5)
    torch.testing.assert_close(lw, by_hand.expand(4, 5), rtol=0, atol=1e-5)


def test_a_site_with_more_dims_than_the_plates_is_a_one_line_error_naming_it():
    def model(x):
        with pyro.plate("data", 10, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0).expand((3, *z.shape)), obs=x)

    _, guide = _conjugate_pair()
    with pytest.raises(ConfigError) as info:
        estimators.log_importance_weights(model, guide, (torch.zeros(10),), {}, 2, 1)
    assert str(info.value) == (
        "site 'x' has batch shape (3, 2, 10), more dims than `max_plate_nesting` + 1 = 2; raise "
        "`max_plate_nesting`"
    )

    # a guide site: the model's z is one global latent (a scalar log density), the guide's has a
    # batch dim left of the particle plate
    def global_model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand((3, 2, 10)).to_event(3))
        with pyro.plate("data", 10, dim=-1):
            pyro.sample("x", dist.Normal(z[0], 1.0), obs=x)

    def batched_guide(x):
        with pyro.plate("data", 10, dim=-1):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand((3, 1, 10)))

    with pytest.raises(ConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimators.log_importance_weights(global_model, batched_guide, (torch.zeros(10),), {}, 2, 1)
    assert str(info.value) == (
        "site 'z' has batch shape (3, 2, 10), more dims than `max_plate_nesting` + 1 = 2; raise "
        "`max_plate_nesting`"
    )


# ------------------------------------------------------------- STL/DReG traces: the guards, masks


def test_an_enumerated_guide_site_is_a_one_line_error_naming_why():
    def guide(x, *, noise):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", _posterior(x, noise), infer={"enumerate": "parallel"})

    with pytest.raises(ConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pyro's own "configured for enumeration" warning
        make_elbo("stl").differentiable_loss(_model, guide, X, noise=NOISE)
    assert str(info.value) == (
        "estimator 'stl' needs reparameterisable guide sites, but site 'z' (Independent) is "
        "enumerated; use 'trace' or 'tracegraph' for score-function gradients"
    )


def test_the_model_guide_check_allows_broadcasting_left_of_max_plate_nesting():
    """The model's prior at z has a batch dim of 2 left of the data plate (max_plate_nesting = 1),
    the guide's has none: Pyro's check allows it, so the STL value is Pyro's Trace_ELBO value."""

    def model(x):
        with pyro.plate("data", 3, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    def guide(x):
        with pyro.plate("data", 3, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, 0.8))

    x = X[:, 0]
    pyro.set_rng_seed(4)
    stl = make_elbo("stl").differentiable_loss(model, guide, x)
    pyro.set_rng_seed(4)
    reference = Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x)
    torch.testing.assert_close(stl, reference, rtol=1e-6, atol=1e-6)


def test_a_site_outside_its_plates_fails_pyros_shape_check():
    def model(x, *, noise):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[-1]), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, noise), obs=x)  # (3, 2) batch, no plate, no to_event

    with pytest.raises(ValueError, match='at site "x", invalid log_prob shape'):
        make_elbo("stl").differentiable_loss(model, _guide, X, noise=NOISE)


def _stl_by_hand(log_joint, log_q_detached):
    """STL's surrogate (Roeder et al. 2017): log p(x, z(phi)) - log q(z(phi); stop_grad(phi))."""
    return -(log_joint - log_q_detached)


def test_stl_honours_a_mask_in_the_guide():
    """The guide masks z at two of the three points: there log q is left out of the value and of
    the gradient alike, as in the surrogate written by hand."""
    g = torch.tensor([True, False, False])
    loc = torch.tensor([[0.2, -0.4], [0.9, 0.1], [-0.3, 1.1]], requires_grad=True)
    drawn = []

    def guide(x, *, noise):
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=g):
            drawn.append(pyro.sample("z", dist.Normal(loc, 0.7).to_event(1)))

    pyro.set_rng_seed(5)
    loss = make_elbo("stl").differentiable_loss(_model, guide, X, noise=NOISE)
    (grad,) = torch.autograd.grad(loss, loc)
    z = loc + 0.7 * ((drawn[0] - loc) / 0.7).detach()  # the same draw, as a function of loc
    log_joint = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Normal(z, NOISE).log_prob(X).sum(-1)
    ).sum()
    log_q = (g * dist.Normal(loc.detach(), 0.7).log_prob(z).sum(-1)).sum()
    hand = _stl_by_hand(log_joint, log_q)
    (hand_grad,) = torch.autograd.grad(hand, loc)
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, hand_grad, rtol=1e-5, atol=1e-6)


def test_stl_with_two_latent_sites_a_keyword_argument_and_a_mask():
    """z1 ~ N(0, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, s^2); q(z1) q(z2 | z1) with the guide's
    scale passed as a keyword and z2 masked at one point. STL re-evaluates log q at the stopped
    values by re-running the guide: the value and gradient equal the surrogate by hand."""
    g = torch.tensor([True, True, False])
    a = torch.tensor(0.6, requires_grad=True)
    loc = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    drawn = []
    x = X[:, 0]

    def model(x, *, scale):
        with pyro.plate("data", 3):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, NOISE), obs=x)

    def guide(x, *, scale):
        with pyro.plate("data", 3):
            z1 = pyro.sample("z1", dist.Normal(loc, scale))
            with poutine.mask(mask=g):
                z2 = pyro.sample("z2", dist.Normal(a * z1, scale))
        drawn.append((z1, z2))

    pyro.set_rng_seed(6)
    loss = make_elbo("stl").differentiable_loss(model, guide, x, scale=0.8)
    grads = torch.autograd.grad(loss, (a, loc))
    eps1 = ((drawn[0][0] - loc) / 0.8).detach()
    eps2 = ((drawn[0][1] - a * drawn[0][0]) / 0.8).detach()
    z1 = loc + 0.8 * eps1
    z2 = a * z1 + 0.8 * eps2
    normal = dist.Normal
    log_joint = (
        normal(0.0, 1.0).log_prob(z1) + normal(z1, 1.0).log_prob(z2) + normal(z2, NOISE).log_prob(x)
    ).sum()
    log_q = (
        normal(loc.detach(), 0.8).log_prob(z1) + g * normal(a.detach() * z1, 0.8).log_prob(z2)
    ).sum()
    hand = _stl_by_hand(log_joint, log_q)
    hand_grads = torch.autograd.grad(hand, (a, loc))
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, hand_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _PartlyReparameterised(dist.Normal):
    """A Normal whose score parts carry both a score-function and an entropy term, as a
    partially reparameterised sampler (e.g. a rejection sampler) reports them."""

    def score_parts(self, value, *args, **kwargs):
        log_prob = self.log_prob(value)
        return ScoreParts(log_prob=log_prob, score_function=log_prob, entropy_term=log_prob)


def test_renyi_refuses_a_partially_reparameterised_site_in_one_line():
    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", _PartlyReparameterised(x / 2, 0.8))

    def model(x):
        with pyro.plate("data", 3):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    with pytest.raises(ConfigError) as info:
        make_elbo("renyi:0.5").differentiable_loss(model, guide, X[:, 0])
    assert str(info.value) == (
        "renyi/iwae cannot handle site 'z': it is partially reparameterised (pyro issue 1222)"
    )


# ----------------------------------------------- spec parsing, options, a global observed site


def test_spec_and_option_refusals_are_exact_and_the_boundaries_accepted():
    with pytest.raises(ConfigError) as info:
        parse_estimator(5)
    assert str(info.value) == "estimator must be a string like 'iwae:5', got 5"
    assert parse_estimator("iwae:1") == ("iwae", 1.0)  # K = 1 is a positive integer
    with pytest.raises(ConfigError) as info:
        parse_estimator("renyi:1")
    assert str(info.value).startswith(
        "alpha of estimator 'renyi' must not be 1 (alpha = 1 is the ELBO: use 'trace'), "
    )
    for bad in (2.5, 0):
        with pytest.raises(ConfigError, match="`num_particles` must be a positive integer"):
            make_elbo("trace", bad)
    for bad in (1.5, -1):
        with pytest.raises(ConfigError, match="`max_plate_nesting` must be a non-negative"):
            make_elbo("trace", max_plate_nesting=bad)
    assert make_elbo("trace", max_plate_nesting=0).max_plate_nesting == 0
    assert IWAE_ELBO().strict_enumeration_warning is True


def test_a_global_observed_site_counts_fully_for_every_point():
    """An observed scalar outside every plate (log N(0.3; 0, 1)) is added to each point's weight,
    as the docstring says, on top of the exact-posterior weights log N(x; 0, 2)."""
    model, guide = _conjugate_pair()

    def with_global(x):
        pyro.sample("c", dist.Normal(0.0, 1.0), obs=torch.tensor(0.3))
        model(x)

    x = torch.linspace(-2.0, 2.0, 10)
    lw = estimators.log_importance_weights(with_global, guide, (x,), {}, 3, 1)
    expected = _conjugate_log_px(x) + dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.3))
    torch.testing.assert_close(lw, expected.expand(3, 10), rtol=0, atol=1e-5)


def test_a_model_without_the_data_plate_is_a_one_line_error():
    def model(x):
        with pyro.plate("points", 10, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("points", 10, dim=-1):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))

    with pytest.raises(ConfigError) as info:
        estimators.log_importance_weights(model, guide, (torch.zeros(10),), {}, 2, 1)
    assert str(info.value) == (
        "log_likelihood needs the data batch in pyro.plate('data'), but no sample site of the "
        "model or guide is inside a vectorised plate named 'data'"
    )
