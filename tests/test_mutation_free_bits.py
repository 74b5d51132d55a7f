"""Free bits (``ppl_vae.inference.free_bits``) against densities and KLs written out by hand.

Each test pins a behaviour that mutation testing found unchecked: the groups and the KL of each
kind of site (factorised with an analytic KL, factorised without one, expanded, not factorised,
global), the ``analytic`` record, the particle average, the default ``beta``, observed sites
before latent ones, and the one-line errors. The model is a tiny linear-Gaussian one with fixed
weights, so the objective of the module docstring can be computed directly:

.. math:: J = -\\sum_i \\log p(x_i \\mid z_i) + \\beta \\sum_g \\max(N \\lambda_g, \\sum_i KL_{i,g}).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae import ConfigError
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.free_bits import FreeBitsLoss, free_bits_loss, site_kl_groups

N, D = 4, 2
X = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.3, 0.8], [2.0, -0.4]])
W = torch.tensor([0.8, -1.2])  # decoder: x_d ~ N(w_d z_d + 0.1, 1)
A = torch.tensor([0.6, 0.3])  # encoder: q(z_d | x) = N(a_d x_d, s_d^2)
S = torch.tensor([0.5, 1.3])
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _normal_logpdf(v, loc, scale):
    return -0.5 * ((v - loc) / scale) ** 2 - torch.log(torch.as_tensor(scale)) - HALF_LOG_2PI


def _kl_to_standard_normal(loc, scale):
    """KL(N(loc, scale^2) || N(0, 1)) per dimension."""
    return 0.5 * (loc**2 + scale**2 - 1) - torch.log(scale)


def _decoder_logpdf(z, x):
    return _normal_logpdf(x, W * z + 0.1, torch.ones(())).sum()


def _prior(expanded=False):
    p = dist.Normal(torch.zeros(D), 1.0).to_event(1)
    return dist.ExpandedDistribution(p, (N,)) if expanded else p


def _model(x, expanded_prior=False, label=None):
    with pyro.plate("data", N):
        if label is not None:  # an observed site before the latent one
            pyro.sample("y", dist.Bernoulli(torch.full((N,), 0.3)), obs=label)
        z = pyro.sample("z", _prior(expanded_prior))
        pyro.sample("x", dist.Normal(W * z + 0.1, 1.0).to_event(1), obs=x)


def _guide(x):
    with pyro.plate("data", N):
        pyro.sample("z", dist.Normal(A * x, S).to_event(1))


def _hand(x, lam, beta, seed, label=None):
    """J for one particle, the draw taken from the same RNG state as the guide's."""
    pyro.set_rng_seed(seed)
    loc, scale = A * x, S.expand(N, D)
    z = dist.Normal(loc, scale).rsample()
    recon = _decoder_logpdf(z, x)
    if label is not None:
        recon = recon + (label * math.log(0.3) + (1 - label) * math.log(0.7)).sum()
    totals = _kl_to_standard_normal(loc, scale).sum(0)  # per dimension, summed over the batch
    return -recon + beta * torch.clamp(totals, min=N * lam).sum(), totals


def _lam_between(totals):
    """A floor between the two dimensions' KLs: one floored, one not."""
    lo, hi = totals.sort().values
    return float(lo + hi) / 2 / N


def test_default_beta_is_one_and_the_value_is_the_hand_objective():
    _, totals = _hand(X, 0.0, 1.0, seed=0)
    lam = _lam_between(totals)
    pyro.set_rng_seed(5)
    loss = FreeBitsLoss(_model, _guide, lam)(X)  # beta left at its default
    hand, _ = _hand(X, lam, 1.0, seed=5)
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)


def test_particles_are_averaged_not_summed():
    _, totals = _hand(X, 0.0, 1.0, seed=0)
    lam = _lam_between(totals)
    beta = 0.6
    pyro.set_rng_seed(7)
    loss = FreeBitsLoss(_model, _guide, lam, num_particles=3)(X, beta)
    # the three particles draw z one after the other from the same stream
    pyro.set_rng_seed(7)
    loc, scale = A * X, S.expand(N, D)
    floor = beta * torch.clamp(totals, min=N * lam).sum()
    values = [-_decoder_logpdf(dist.Normal(loc, scale).rsample(), X) + floor for _ in range(3)]
    torch.testing.assert_close(loss, sum(values) / 3, rtol=1e-6, atol=1e-6)


def test_an_observed_site_before_a_latent_one_does_not_end_the_sum():
    label = torch.tensor([1.0, 0.0, 0.0, 1.0])
    _, totals = _hand(X, 0.0, 1.0, seed=0)
    lam = _lam_between(totals)
    model = functools.partial(_model, label=label)
    pyro.set_rng_seed(2)
    loss = FreeBitsLoss(model, _guide, lam)(X, 0.8)
    hand, _ = _hand(X, lam, 0.8, seed=2, label=label)
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)


def test_an_expanded_factorised_prior_still_gets_the_analytic_kl_per_dimension():
    q = dist.Normal(A * X, S).to_event(1)
    p = _prior(expanded=True)
    assert type(p).__name__ == "ExpandedDistribution"
    terms, analytic, dims = site_kl_groups(q, p, q.sample())
    assert analytic is True and dims == 1
    torch.testing.assert_close(terms, _kl_to_standard_normal(A * X, S.expand(N, D)))
    # and an expanded posterior as well
    q_expanded = dist.ExpandedDistribution(dist.Normal(torch.zeros(D), S).to_event(1), (N,))
    terms, analytic, dims = site_kl_groups(q_expanded, p, q_expanded.sample())
    assert analytic is True and dims == 1
    torch.testing.assert_close(terms, _kl_to_standard_normal(torch.zeros(N, D), S.expand(N, D)))
    # through the loss: one floor per dimension, the KL in closed form, recorded as analytic
    _, totals = _hand(X, 0.0, 1.0, seed=0)
    lam = _lam_between(totals)
    loss_fn = FreeBitsLoss(functools.partial(_model, expanded_prior=True), _guide, lam)
    pyro.set_rng_seed(3)
    loss = loss_fn(X, 0.5)
    hand, _ = _hand(X, lam, 0.5, seed=3)
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)
    assert loss_fn.analytic == {"z": True}


def _cauchy_logpdf(v):
    return -torch.log(math.pi * (1 + v**2))


def test_a_factorised_pair_without_a_registered_kl_is_log_q_minus_log_p_per_dimension():
    q = dist.Normal(A * X, S).to_event(1)
    p = dist.Cauchy(torch.zeros(D), 1.0).to_event(1)  # no KL(Normal || Cauchy) is registered
    z = q.sample()
    terms, analytic, dims = site_kl_groups(q, p, z)
    assert analytic is False and dims == 1
    torch.testing.assert_close(terms, _normal_logpdf(z, A * X, S) - _cauchy_logpdf(z))

    def model(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Cauchy(torch.zeros(D), 1.0).to_event(1))

    def guide(x):
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(A * x, S).to_event(1))

    pyro.set_rng_seed(4)
    z = dist.Normal(A * X, S).rsample()
    per_dim = (_normal_logpdf(z, A * X, S) - _cauchy_logpdf(z)).sum(0)
    lam = float(per_dim.max()) / N + 1.0  # above both: each dimension floored at N * lam
    loss_fn = FreeBitsLoss(model, guide, lam)
    pyro.set_rng_seed(4)
    torch.testing.assert_close(loss_fn(X, 1.0), torch.tensor(D * N * lam), rtol=1e-6, atol=1e-5)
    assert loss_fn.analytic == {"z": False}


def _bivariate_normal_logpdf(v, loc, s1, s2, rho):
    u1, u2 = (v[..., 0] - loc[..., 0]) / s1, (v[..., 1] - loc[..., 1]) / s2
    quad = (u1**2 - 2 * rho * u1 * u2 + u2**2) / (1 - rho**2)
    return -0.5 * quad - math.log(2 * math.pi * s1 * s2 * math.sqrt(1 - rho**2))


def _correlated(loc):
    s1, s2, rho = 0.7, 1.1, 0.4
    cov = torch.tensor([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]])
    return dist.MultivariateNormal(loc, covariance_matrix=cov), (s1, s2, rho)


@pytest.mark.parametrize("batch", [(N,), ()], ids=["in the data plate", "global"])
def test_a_site_that_does_not_factorise_is_one_group_with_the_monte_carlo_kl(batch):
    q, (s1, s2, rho) = _correlated(torch.zeros(*batch, D) + torch.tensor([0.3, -0.2]))
    p = dist.Normal(torch.zeros(*batch, D), 1.0).to_event(1)
    z = q.sample()
    terms, analytic, dims = site_kl_groups(q, p, z)
    assert analytic is False and dims == D
    hand = _bivariate_normal_logpdf(z, q.loc, s1, s2, rho) - _normal_logpdf(z, 0.0, 1.0).sum(-1)
    torch.testing.assert_close(terms, hand.unsqueeze(-1), rtol=1e-5, atol=1e-6)


def test_a_global_factorised_latent_has_one_group_per_dimension():
    loc = torch.tensor([0.4, -1.5])

    def model(x):
        pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))

    def guide(x):
        pyro.sample("z", dist.Normal(loc, S).to_event(1))

    # the global KL counts once, against the floor N * lam of the summed convention
    # (N times max(lam, KL / N), the per-point objective)
    kl = _kl_to_standard_normal(loc, S)
    lam = float(kl.min() + kl.max()) / 2 / N  # one dimension floored, one not
    loss_fn = FreeBitsLoss(model, guide, lam)
    hand = torch.clamp(kl, min=N * lam).sum()
    torch.testing.assert_close(loss_fn(X, 2.0), 2.0 * hand, rtol=1e-6, atol=1e-6)
    assert loss_fn.analytic == {"z": True}


@pytest.mark.parametrize("free_bits", [0.0, -0.5])
def test_a_floor_that_is_not_positive_is_a_one_line_error(free_bits):
    with pytest.raises(ConfigError) as info:
        FreeBitsLoss(_model, _guide, free_bits)
    message = str(info.value)
    assert "`free_bits` must be > 0" in message and f"got {free_bits}" in message
    assert len(message.splitlines()) == 1


def test_a_latent_site_the_guide_does_not_sample_is_named_in_the_error():
    def model(x):
        with pyro.plate("data", N):
            pyro.sample("w", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            z = pyro.sample("z", _prior())
            pyro.sample("x", dist.Normal(W * z, 1.0).to_event(1), obs=x)

    with pytest.raises(ConfigError, match="the guide does not sample latent site 'w'"):
        FreeBitsLoss(model, _guide, 0.1)(X)


@pytest.mark.parametrize("estimator", ["trace", "meanfield"])
def test_the_runs_free_bits_loss_for_a_pathwise_estimator(estimator):
    _, totals = _hand(X, 0.0, 1.0, seed=0)
    lam = _lam_between(totals)
    cfg = SimpleNamespace(free_bits=lam, estimator=estimator)
    loss_fn = free_bits_loss(cfg, _model, _guide, make_elbo(estimator, num_particles=3))
    assert isinstance(loss_fn, FreeBitsLoss) and loss_fn.num_particles == 3
    pyro.set_rng_seed(6)
    single = free_bits_loss(cfg, _model, _guide, object())  # an objective without particles: 1
    assert single.num_particles == 1
    loss = single(X, 0.9)
    hand, _ = _hand(X, lam, 0.9, seed=6)
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)


def test_no_free_bits_loss_without_a_floor():
    elbo = make_elbo("trace")
    assert (
        free_bits_loss(SimpleNamespace(free_bits=0.0, estimator="trace"), _model, _guide, elbo)
        is None
    )
    assert free_bits_loss(SimpleNamespace(estimator="trace"), _model, _guide, elbo) is None


@pytest.mark.parametrize("estimator", ["iwae:3", "tracegraph", "renyi", "stl", "dreg", "enum"])
def test_free_bits_with_another_bound_is_a_one_line_error(estimator):
    cfg = SimpleNamespace(free_bits=0.5, estimator=estimator)
    with pytest.raises(ConfigError) as info:
        free_bits_loss(cfg, _model, _guide, make_elbo(estimator))
    message = str(info.value)
    assert "use estimator trace or meanfield" in message and f"not {estimator!r}" in message
    assert len(message.splitlines()) == 1
