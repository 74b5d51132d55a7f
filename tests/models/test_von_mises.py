r"""The reparameterised von Mises distribution and the von Mises prior.

References are computed independently of the code under test: the CDF and expectations by
``scipy.integrate.quad`` of the density, samples against ``scipy.stats.vonmises.cdf``, the KL
against a Monte Carlo average. Every statistical check states its tolerance; seeds are fixed.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence as pyro_kl_divergence
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from scipy import integrate, special, stats
from torch import nn
from torch.distributions import kl_divergence, register_kl

from ppl_vae.models.distributions.family import MirrorFamily
from ppl_vae.models.distributions.von_mises import (
    ReparameterizedVonMises,
    _kl_von_mises_von_mises,
    von_mises_cdf,
    von_mises_implicit_grad,
    von_mises_kl,
)
from ppl_vae.models.errors import ConfigError
from ppl_vae.models.priors.von_mises import VonMisesPrior

KAPPAS = [1e-3, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4]
DTYPES = [torch.float32, torch.float64]


# -- references by quadrature -----------------------------------------------------------------
def _density(t: float, kappa: float) -> float:
    return math.exp(-2.0 * kappa * math.sin(0.5 * t) ** 2) / (2.0 * math.pi * special.i0e(kappa))


def _width(kappa: float) -> float:
    """Scale of the bulk: 1/sqrt(kappa) for concentrated densities, else 1."""
    return 1.0 / math.sqrt(kappa) if kappa > 1.0 else 1.0


def _quad(fun, a: float, b: float, kappa: float) -> float:
    """Integral of fun(t) * density(t) over [a, b], break points at the bulk of the density."""
    s = _width(kappa)
    points = [p * s for p in (-8, -3, -1, 0, 1, 3, 8) if a < p * s < b]
    value, _ = integrate.quad(
        lambda t: fun(t) * _density(t, kappa),
        a,
        b,
        points=points or None,
        epsabs=1e-14,
        epsrel=1e-12,
        limit=200,
    )
    return value


def _quad_cdf(x: float, kappa: float) -> float:
    """F(x) = integral of the density from -pi; the shorter side is integrated directly."""
    if x <= 0.0:
        return _quad(lambda t: 1.0, -math.pi, x, kappa)
    return 1.0 - _quad(lambda t: 1.0, x, math.pi, kappa)


def _angle_grid(kappa: float) -> list[float]:
    """A fixed grid over the circle plus points at +-0.3, 1, 3 widths of the bulk."""
    grid = [float(x) for x in np.linspace(-math.pi, math.pi, 9)]
    s = _width(kappa)
    grid += [t * s for t in (-3.0, -1.0, -0.3, 0.3, 1.0, 3.0) if abs(t * s) < math.pi]
    return grid


# -- the CDF ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kappa", KAPPAS)
def test_cdf_matches_quadrature(kappa: float, dtype: torch.dtype) -> None:
    # Tolerance: float64 1e-10 absolute (the series is exact to rounding below kappa = 50, the
    # normal approximation within 6e-12 above; quad is asked for 1e-14). float32 2e-7
    # absolute: 3 ulps of float32 at 1 (the CDF is computed in float64 and rounded once). The
    # reference is evaluated at the float32-rounded angle.
    x = torch.tensor(_angle_grid(kappa), dtype=dtype)
    got = von_mises_cdf(x, torch.tensor(kappa, dtype=dtype))
    assert got.dtype == dtype
    ref = torch.tensor([_quad_cdf(float(v), kappa) for v in x.double()], dtype=torch.float64)
    atol = 1e-10 if dtype == torch.float64 else 2e-7
    torch.testing.assert_close(got.double(), ref, atol=atol, rtol=0.0)


def test_the_distributions_cdf_is_counted_from_loc_minus_pi() -> None:
    r"""``ReparameterizedVonMises(mu, kappa).cdf(v)`` is the integral of its density from
    :math:`\mu - \pi` to ``v`` (quadrature, 1e-10 absolute in float64), for a location away
    from 0 so that a shift of the wrong sign fails."""
    loc, kappa = 0.9, 2.5
    d = ReparameterizedVonMises(
        torch.tensor(loc, dtype=torch.float64), torch.tensor(kappa, dtype=torch.float64)
    )
    v = torch.linspace(loc - math.pi + 0.05, loc + math.pi - 0.05, 9, dtype=torch.float64)
    ref = torch.tensor([_quad_cdf(float(t) - loc, kappa) for t in v], dtype=torch.float64)
    torch.testing.assert_close(d.cdf(v), ref, atol=1e-10, rtol=0.0)


def test_cdf_is_periodic_and_monotone() -> None:
    # F(x + 2 pi k) = F(x) + k to 1e-12, and F is nondecreasing on a fine grid (float64).
    x = torch.linspace(-math.pi, math.pi, 2001, dtype=torch.float64)
    for kappa in KAPPAS:
        k = torch.tensor(kappa, dtype=torch.float64)
        f = von_mises_cdf(x, k)
        assert bool((f.diff() >= -1e-15).all()), kappa
        torch.testing.assert_close(
            von_mises_cdf(x[1:-1] + 4 * math.pi, k), f[1:-1] + 2.0, atol=1e-12, rtol=0.0
        )


# -- implicit reparameterisation gradients ----------------------------------------------------
@pytest.mark.parametrize("kappa", KAPPAS)
def test_dcdf_dconcentration_matches_finite_differences(kappa: float) -> None:
    # dF/dk (closed form, via autograd of von_mises_cdf) against central differences of the CDF
    # with step h = 1e-4 kappa, float64. Tolerance 1e-7 relative to the largest |dF/dk| on the
    # grid (plus 1e-7 pointwise): truncation ~ (h/kappa)^2 = 1e-8, rounding ~ 1e-16 / h
    # relative to dF/dk ~ 1/kappa; the observed error is below 5e-10.
    # The implicit gradient -dF/dk / p is then checked pointwise against -FD / p with the same
    # tolerance scaled by 1/p.
    x = torch.tensor(_angle_grid(kappa), dtype=torch.float64)
    k = torch.full_like(x, kappa, requires_grad=True)
    (dcdf,) = torch.autograd.grad(von_mises_cdf(x, k).sum(), k)
    h = 1e-4 * kappa
    with torch.no_grad():
        fd = (von_mises_cdf(x, k + h) - von_mises_cdf(x, k - h)) / (2 * h)
    atol = 1e-7 * float(fd.abs().max())
    torch.testing.assert_close(dcdf, fd, atol=atol, rtol=1e-7)
    p = ReparameterizedVonMises(torch.zeros_like(x), k.detach()).log_prob(x).exp()
    implicit = von_mises_implicit_grad(x, k.detach())
    assert bool(implicit.isfinite().all())
    torch.testing.assert_close(implicit * p, -fd, atol=atol, rtol=1e-7)


def _quad_implicit_grad(x: float, kappa: float) -> float:
    r"""-dF/dk / p by quadrature: for x <= 0,
    :math:`-\int_{-\pi}^{x} e^{\kappa(\cos t - \cos x)} (\cos t - A(\kappa))\,dt` (integrand
    bounded by 2, so no cancellation); odd in x."""
    if x > 0:
        return -_quad_implicit_grad(-x, kappa)
    a = special.i1e(kappa) / special.i0e(kappa)
    width = 1.0 / (kappa * max(abs(math.sin(x)), 1e-3)) if kappa > 1 else 1.0
    points = [x - c * width for c in (1, 5, 20, 80) if x - c * width > -math.pi]
    value, _ = integrate.quad(
        lambda t: (
            math.exp(2 * kappa * (math.sin(x / 2) ** 2 - math.sin(t / 2) ** 2)) * (math.cos(t) - a)
        ),
        -math.pi,
        x,
        points=points or None,
        epsabs=1e-13,
        epsrel=1e-10,
        limit=400,
    )
    return -value


@pytest.mark.parametrize("kappa", [*KAPPAS, 15.0, 30.0, 49.9])
def test_implicit_gradient_matches_quadrature_and_is_bounded(kappa: float) -> None:
    # Independently of the CDF: dz/dk against the quadrature ratio above, 1e-4 relative plus
    # 1e-9 absolute, wherever p(z) >= 1e-11 (observed error < 1e-5). Over the whole circle
    # (20001 points) it is finite and |dz/dk| <= 1 (the exact bound, attained as k -> 0 by
    # -sin z): in the far tails of 12 < k < 50 the series' dF/dk is rounding noise, and the
    # normal-approximation fallback must keep the gradient sane there.
    x = torch.tensor(_angle_grid(kappa), dtype=torch.float64)
    grad = von_mises_implicit_grad(x, kappa)
    log_p = ReparameterizedVonMises(torch.zeros_like(x), torch.full_like(x, kappa)).log_prob(x)
    for value, xv, lp in zip(grad.tolist(), x.tolist(), log_p.tolist(), strict=True):
        if lp >= math.log(1e-11):
            ref = _quad_implicit_grad(xv, kappa)
            assert abs(value - ref) <= 1e-4 * abs(ref) + 1e-9, (xv, value, ref)
    circle = torch.linspace(-math.pi, math.pi, 20001, dtype=torch.float64)
    for dtype in DTYPES:
        g = von_mises_implicit_grad(circle.to(dtype), kappa)
        assert bool(g.isfinite().all()) and float(g.abs().max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_rsample_gradients_are_the_implicit_gradients(dtype: torch.dtype) -> None:
    # autograd through rsample returns exactly von_mises_implicit_grad at the drawn angles for
    # dz/dkappa (same computation: bitwise equality) and exactly 1 for dz/dloc. Independently,
    # the float64 draws match -(central differences of the CDF)/p to 1e-6 relative (as above).
    n = 50
    kappa = torch.tensor(KAPPAS, dtype=dtype).repeat_interleave(n).requires_grad_()
    loc = torch.linspace(-3.0, 3.0, kappa.numel(), dtype=dtype).requires_grad_()
    z = ReparameterizedVonMises(loc, kappa).rsample()
    assert z.dtype == dtype
    assert bool(((z >= -math.pi) & (z < math.pi)).all())
    grad_loc, grad_kappa = torch.autograd.grad(z.sum(), [loc, kappa])
    assert torch.equal(grad_loc, torch.ones_like(loc))
    expected = von_mises_implicit_grad(z.detach().double() - loc.detach().double(), kappa.detach())
    assert torch.equal(grad_kappa, expected.to(dtype))
    if dtype == torch.float64:
        w = (z.detach() - loc.detach() + math.pi) % (2 * math.pi) - math.pi
        kd = kappa.detach()
        h = 1e-4 * kd
        fd = (von_mises_cdf(w, kd + h) - von_mises_cdf(w, kd - h)) / (2 * h)
        p = ReparameterizedVonMises(torch.zeros_like(w), kd).log_prob(w).exp()
        torch.testing.assert_close(
            grad_kappa * p, -fd, atol=1e-6 * float(fd.abs().max()), rtol=1e-6
        )


def _f(z: torch.Tensor) -> torch.Tensor:
    return torch.cos(z) + torch.sin(2.0 * z) ** 2


def _expected_f(loc: float, kappa: float) -> float:
    """E[f(z)], z ~ vM(loc, kappa), by quadrature over the centred angle."""
    return _quad(
        lambda w: math.cos(loc + w) + math.sin(2.0 * (loc + w)) ** 2, -math.pi, math.pi, kappa
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kappa", [1e-3, 1.0, 10.0, 100.0])
def test_pathwise_gradient_matches_quadrature(kappa: float, dtype: torch.dtype) -> None:
    # d/dkappa and d/dloc of E[f(z)], f = cos z + sin^2 2z, loc = 0.7: the Monte Carlo mean of
    # per-sample pathwise gradients (20000 rsamples) against central differences of the
    # quadrature value (steps 1e-3 kappa and 1e-4 rad; error < 1e-8, far below the MC error).
    # Tolerance: 5 standard errors of the MC mean (false failure ~6e-7 per check).
    n, loc0 = 20_000, 0.7
    torch.manual_seed(1)
    kappa_t = torch.full((n,), kappa, dtype=dtype, requires_grad=True)
    loc_t = torch.full((n,), loc0, dtype=dtype, requires_grad=True)
    z = ReparameterizedVonMises(loc_t, kappa_t).rsample()
    g_loc, g_kappa = torch.autograd.grad(_f(z).sum(), [loc_t, kappa_t])
    h = 1e-3 * kappa
    ref_kappa = (_expected_f(loc0, kappa + h) - _expected_f(loc0, kappa - h)) / (2 * h)
    ref_loc = (_expected_f(loc0 + 1e-4, kappa) - _expected_f(loc0 - 1e-4, kappa)) / 2e-4
    for g, ref in ((g_kappa.double(), ref_kappa), (g_loc.double(), ref_loc)):
        se = float(g.std()) / math.sqrt(n)
        assert abs(float(g.mean()) - ref) < 5 * se, (float(g.mean()), ref, se)


# -- samples against the density --------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kappa", [1e-3, 0.1, 1.0, 10.0, 100.0, 1e4])
def test_samples_follow_the_density(kappa: float, dtype: torch.dtype) -> None:
    # Kolmogorov-Smirnov of 4000 draws (loc = 1, centred and wrapped) against
    # scipy.stats.vonmises.cdf; p > 1e-3 (the false-failure rate under the null), seed fixed.
    # For kappa >= 100 the standardised angle t = sqrt(kappa) * w is compared against
    # F(t / sqrt(kappa)) (KS is invariant under this monotone map; it keeps the sample on an O(1)
    # scale). The sampler also passes at p > 0.3 with 400000 draws (checked once, not here).
    torch.manual_seed(2)
    loc = torch.tensor(1.0, dtype=dtype)
    z = ReparameterizedVonMises(loc, torch.tensor(kappa, dtype=dtype)).sample((4000,))
    assert z.dtype == dtype
    assert bool(((z >= -math.pi) & (z < math.pi)).all())
    w = ((z.double() - 1.0 + math.pi) % (2 * math.pi) - math.pi).numpy()
    if kappa >= 100:
        s = math.sqrt(kappa)
        result = stats.kstest(w * s, lambda t: stats.vonmises.cdf(t / s, kappa))
    else:
        result = stats.kstest(w, lambda t: stats.vonmises.cdf(t, kappa))
    assert result.pvalue > 1e-3, result


def test_circular_mean_and_variance() -> None:
    # mean = loc and variance = 1 - I1/I0 (circular) against 20000 draws: the resultant length
    # |mean(e^{iz})| within 5 standard errors of 1 - variance.
    torch.manual_seed(3)
    d = ReparameterizedVonMises(torch.tensor([0.5, -2.0]), torch.tensor([0.7, 20.0]))
    z = d.sample((20_000,)).double()
    c = torch.cos(z - d.mean.double())
    se = c.std(0) / math.sqrt(z.shape[0])
    assert bool(((c.mean(0) - (1 - d.variance.double())).abs() < 5 * se).all())
    assert torch.equal(d.mean, d.loc)


# -- KL ---------------------------------------------------------------------------------------
KL_CASES = [
    # (kappa_q, kappa_p, loc_q - loc_p)
    (1e-3, 1e-3, 2.0),
    (1e-3, 1.0, 1.0),
    (0.1, 10.0, 0.5),
    (1.0, 1e-3, -1.0),
    (10.0, 1.0, 3.0),
    (100.0, 10.0, 0.2),
    (1e3, 1e4, 0.01),
    (1e4, 1e3, 0.02),
    (1e4, 1e4, 0.005),
    (1e4, 1e-3, 1.0),
    (1e-3, 1e4, 0.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kappa_q", "kappa_p", "delta"), KL_CASES)
def test_kl_matches_monte_carlo(
    kappa_q: float, kappa_p: float, delta: float, dtype: torch.dtype
) -> None:
    # KL(q || p) by kl_divergence (registered closed form) against the mean of
    # log q(z) - log p(z) over 20000 draws z ~ q. Tolerance: 5 standard errors, plus a relative
    # term for rounding of the log densities in the MC average: 1e-5 in float32
    # (~ 100 ulps of the log densities' magnitude, mean |log q| + mean |log p|), 1e-12 in
    # float64. (With kappa_q = kappa_p and a tiny angle the MC terms are nearly constant and
    # the standard error alone would demand agreement beyond float32 precision.)
    # The closed form itself (float64 inside, cast back) also matches the textbook formula
    # evaluated with scipy in float64: 1e-6 relative in float32 (rounding of the result and of
    # the float32 angle), 1e-10 in float64, plus 1e-9 absolute.
    torch.manual_seed(4)
    q = ReparameterizedVonMises(
        torch.tensor(0.3 + delta, dtype=dtype), torch.tensor(kappa_q, dtype=dtype)
    )
    p = ReparameterizedVonMises(torch.tensor(0.3, dtype=dtype), torch.tensor(kappa_p, dtype=dtype))
    kl = kl_divergence(q, p)
    assert kl.dtype == dtype and kl.shape == ()
    d = float(q.loc.double() - p.loc.double())
    a1 = special.i1e(kappa_q) / special.i0e(kappa_q)
    textbook = (
        math.log(special.i0e(kappa_p))
        + kappa_p
        - math.log(special.i0e(kappa_q))
        - kappa_q
        + a1 * (kappa_q - kappa_p * math.cos(d))
    )
    rel = 1e-6 if dtype == torch.float32 else 1e-10
    assert abs(float(kl) - textbook) <= rel * abs(textbook) + 1e-9, (float(kl), textbook)
    z = q.sample((20_000,))
    log_q, log_p = q.log_prob(z).double(), p.log_prob(z).double()
    terms = log_q - log_p
    se = float(terms.std()) / math.sqrt(terms.numel())
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = float(log_q.abs().mean() + log_p.abs().mean())
    assert abs(float(kl) - float(terms.mean())) <= 5 * se + rtol * scale, (
        float(kl),
        float(terms.mean()),
        se,
    )
    assert float(kl) >= -rtol * scale


def test_kl_is_found_for_wrappers_and_pyro_von_mises() -> None:
    # The registered KL is found by torch's and Pyro's kl_divergence, for Independent
    # (.to_event) wrappers (sum over the event dim), for plate-expanded distributions and
    # against pyro's dist.VonMises in either order; all equal von_mises_kl to 1e-12.
    dtype = torch.float64
    q = ReparameterizedVonMises(
        torch.tensor([0.1, 2.0, -1.0], dtype=dtype), torch.tensor([0.5, 30.0, 2e3], dtype=dtype)
    )
    p = ReparameterizedVonMises(
        torch.zeros(3, dtype=dtype), torch.tensor([1.0, 1e-3, 1e3], dtype=dtype)
    )
    base = von_mises_kl(q.loc, q.concentration, p.loc, p.concentration)
    torch.testing.assert_close(pyro_kl_divergence(q, p), base, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        pyro_kl_divergence(q.to_event(1), p.to_event(1)), base.sum(), atol=1e-12, rtol=0
    )
    expanded = kl_divergence(q.expand((4, 3)).to_event(1), p.expand((4, 3)).to_event(1))
    torch.testing.assert_close(expanded, base.sum().expand(4), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        kl_divergence(q, dist.VonMises(p.loc, p.concentration)), base, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        kl_divergence(dist.VonMises(q.loc, q.concentration), p), base, atol=1e-12, rtol=0
    )
    assert kl_divergence(q, q).abs().max() < 1e-12


@pytest.fixture
def kl_calls():
    """Wrap the registered (vM, vM) KL to count its calls; restore it afterwards."""
    calls: list[torch.Size] = []

    def counting(p: ReparameterizedVonMises, q: ReparameterizedVonMises) -> torch.Tensor:
        calls.append(p.batch_shape)
        return _kl_von_mises_von_mises(p, q)

    register_kl(ReparameterizedVonMises, ReparameterizedVonMises)(counting)
    try:
        yield calls
    finally:
        register_kl(ReparameterizedVonMises, ReparameterizedVonMises)(_kl_von_mises_von_mises)


# -- the prior --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"latent_dim": 2, "concentration": 0.0}, "`concentration` must be positive, got 0.0"),
        ({"latent_dim": 2, "concentration": -1.0}, "`concentration` must be positive, got -1.0"),
        ({"latent_dim": 2, "concentration": [1.0, -2.0]}, "got [1.0, -2.0]"),
        ({"latent_dim": 2, "concentration": float("nan")}, "got nan"),
        ({"latent_dim": 3, "concentration": [1.0, 2.0]}, "shape (3,)"),
        ({"latent_dim": 0}, "`latent_dim` must be a positive integer, got 0"),
        ({"latent_dim": -2}, "got -2"),
        ({"latent_dim": 2.5}, "got 2.5"),
    ],
)
def test_prior_rejects_bad_input(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        VonMisesPrior(**kwargs)
    assert fragment in str(info.value)


def test_distribution_rejects_nonpositive_concentration() -> None:
    with pytest.raises(
        ConfigError, match=r"`concentration` must be positive, got tensor\(\[-1\.\]\)"
    ):
        ReparameterizedVonMises(torch.zeros(1), torch.tensor([-1.0]))
    # validate_args=False skips the check, as in torch.distributions.
    ReparameterizedVonMises(torch.zeros(1), torch.tensor([-1.0]), validate_args=False)


def test_prior_shapes_geometry_and_guide_family() -> None:
    prior = VonMisesPrior(3, concentration=[0.5, 1.0, 4.0])
    prior.validate()
    p = prior()
    assert p.event_shape == (3,) and p.batch_shape == ()
    z = p.rsample((5,))
    assert z.shape == (5, 3) and p.log_prob(z).shape == (5,)
    assert prior.embed_dim == 6
    torch.testing.assert_close(prior.embed(z), torch.cat([z.cos(), z.sin()], -1))
    # expand, as a plate does
    assert p.expand((7,)).sample().shape == (7, 3)
    # the mirrored guide family is the same reparameterised von Mises
    family = prior.guide_family()
    assert isinstance(family, MirrorFamily)
    assert list(family.param_constraints) == ["loc", "concentration"]
    q = family.build(**family.constrain(torch.randn(4, 6), 3))
    assert isinstance(q.base_dist, ReparameterizedVonMises) and q.has_rsample
    assert q.batch_shape == (4,) and q.event_shape == (3,)
    # interpolation takes the shorter arc: 3 -> -3 crosses pi (length 2 pi - 6, not 6)
    t = torch.linspace(0, 1, 5)
    path = prior.interpolate(torch.tensor([3.0, 0.0, 1.0]), torch.tensor([-3.0, 1.0, 1.0]), t)
    assert path.shape == (5, 3)
    assert bool(((path >= -math.pi) & (path < math.pi)).all())
    torch.testing.assert_close(path[2, 0].abs(), torch.tensor(math.pi), atol=1e-6, rtol=0)
    torch.testing.assert_close(path[:, 1], t)
    torch.testing.assert_close(path[-1], torch.tensor([-3.0, 1.0, 1.0]))
    # learn_loc makes loc a parameter
    learned = VonMisesPrior(2, learn_loc=True)
    assert [n for n, _ in learned.named_parameters()] == ["loc_unconstrained"]


def test_prior_moves_to_device(device: torch.device) -> None:
    prior = VonMisesPrior(4, concentration=2.0).to(device)
    p = prior()
    z = p.rsample((3,))
    assert z.device.type == device.type
    assert p.log_prob(z).device.type == device.type
    assert prior.embed(z).device.type == device.type
    kl = kl_divergence(p, prior())
    assert kl.device.type == device.type and float(kl) == pytest.approx(0.0, abs=1e-6)
    k = torch.full((4,), 3.0, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(ReparameterizedVonMises(torch.zeros_like(k), k).rsample().sum(), k)
    assert g.device.type == device.type and bool(g.isfinite().all())


def test_prior_figures(tmp_path) -> None:
    torch.manual_seed(5)
    z = VonMisesPrior(3, concentration=2.0)().sample((200,))
    labels = torch.arange(200) % 4
    paths = VonMisesPrior(3).figures(z, labels, tmp_path / "figs")
    assert [p.name for p in paths] == ["von_mises_angles.png", "von_mises_torus.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = VonMisesPrior(1).figures(z[:, :1], None, tmp_path / "one")
    assert [p.name for p in one] == ["von_mises_angles.png"]


# -- training with Pyro ELBOs -----------------------------------------------------------------
class _TinyVAE(nn.Module):
    """model/guide pair of the contract: plate "data", q(z|x) = family.build(encoder(x))."""

    def __init__(self, prior: VonMisesPrior, data_dim: int) -> None:
        super().__init__()
        self.prior = prior
        self.family = prior.guide_family()
        self.encoder = nn.Linear(data_dim, self.family.num_params * prior.latent_dim)
        self.decoder = nn.Linear(prior.embed_dim, data_dim)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())
            loc = self.decoder(self.prior.embed(z))
            pyro.sample("x", dist.Normal(loc, 0.3).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            params = self.family.constrain(self.encoder(x), self.prior.latent_dim)
            pyro.sample("z", self.family.build(**params))


def _angle_data(n: int = 64) -> torch.Tensor:
    angles = torch.rand(n, 2) * 2 * math.pi
    x = torch.cat([angles.cos(), angles.sin()], -1)
    return x + 0.1 * torch.randn_like(x)


def test_trace_elbo_uses_pathwise_gradients() -> None:
    # The guide site is reparameterised (rsample, no score-function term in the surrogate),
    # whereas pyro's dist.VonMises guide gets a score-function term.
    vae = _TinyVAE(VonMisesPrior(2), 4)
    x = _angle_data(8)
    trace = poutine.trace(vae.guide).get_trace(x)
    trace.compute_score_parts()
    site = trace.nodes["z"]
    assert site["fn"].has_rsample and site["value"].requires_grad
    assert is_identically_zero(site["score_parts"].score_function)

    def score_guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.VonMises(torch.zeros(2), torch.ones(2)).to_event(1))

    score_trace = poutine.trace(score_guide).get_trace(x)
    score_trace.compute_score_parts()
    assert not is_identically_zero(score_trace.nodes["z"]["score_parts"].score_function)


def test_trace_mean_field_uses_registered_kl(kl_calls: list) -> None:
    vae = _TinyVAE(VonMisesPrior(2), 4)
    x = _angle_data(8)
    loss = TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x)
    assert torch.isfinite(loss)
    assert kl_calls == [torch.Size([8, 2])]


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_svi_steps_decrease_the_loss(elbo_cls: type) -> None:
    # 60 Adam steps on 64 points: all losses finite, mean of the last 10 below the first 10.
    torch.manual_seed(6)
    x = _angle_data()
    vae = _TinyVAE(VonMisesPrior(2, learn_loc=True), 4)
    optim = torch.optim.Adam(vae.parameters(), lr=0.05)
    elbo = elbo_cls()
    losses = []
    for _ in range(60):
        optim.zero_grad()
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
