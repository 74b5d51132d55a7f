r"""Importance-sampled log-likelihood: >= the ELBO, and exact in the limit on a linear-Gaussian VAE.

With a linear decoder :math:`x = Wz + b + \sigma\epsilon` and :math:`z \sim N(0, I)`, the
marginal is :math:`N(b, WW^T + \sigma^2 I)`, so :math:`\log p(x)` is known in closed form.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from ppl_vae import build_vae, score
from ppl_vae.inference.scoring import Scores, log_weights

SIGMA = 0.5


def linear_gaussian_vae(exact_posterior_mean: bool):
    """A linear-Gaussian VAE; with ``exact_posterior_mean`` q(z|x) is the exact posterior."""
    torch.manual_seed(1)
    vae = build_vae(
        (4,),
        likelihood="normal",
        likelihood_args={"scale": "fixed", "init_scale": SIGMA},
        latent_dim=2,
        hidden_dims=(),
    ).double()
    W, b = vae.decoder.net[0].weight, vae.decoder.net[0].bias  # (4, 2), (4,)
    if exact_posterior_mean:
        # Orthogonal columns make W^T W diagonal, so the exact posterior is mean-field and q
        # can equal it: then log w = log p(x) for every sample (zero variance).
        q_, _ = torch.linalg.qr(torch.randn(4, 2, dtype=W.dtype))
        with torch.no_grad():
            W.copy_(q_ * torch.tensor([1.5, 0.7], dtype=W.dtype))
    cov_post = torch.linalg.inv(torch.eye(2, dtype=W.dtype) + W.T @ W / SIGMA**2)
    with torch.no_grad():
        head = vae.encoder.head  # (4 -> 2 loc + 2 raw scale)
        if exact_posterior_mean:
            A = cov_post @ W.T / SIGMA**2
            head.weight[:2] = A
            head.bias[:2] = -A @ b
            head.weight[2:] = 0.0
            head.bias[2:] = torch.log(torch.sqrt(torch.diagonal(cov_post)))  # exp bijection
    return vae, W.detach(), b.detach()


def exact_log_marginal(x, W, b):
    cov = W @ W.T + SIGMA**2 * torch.eye(W.shape[0], dtype=W.dtype)
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def test_log_likelihood_converges_to_the_exact_value():
    vae, W, b = linear_gaussian_vae(exact_posterior_mean=True)
    x = torch.randn(50, 4, dtype=torch.float64) + b
    exact = exact_log_marginal(x, W, b)
    s = score(vae, x, num_samples=300, chunk_size=64)
    # q is the exact posterior: every importance weight equals p(x), so the estimate and the
    # ELBO are exact up to float64 rounding.
    assert torch.allclose(s.log_likelihood, exact, atol=1e-8)
    assert torch.allclose(s.elbo, exact, atol=1e-8)


def test_log_likelihood_improves_with_k_and_bounds_the_elbo():
    vae, W, b = linear_gaussian_vae(exact_posterior_mean=True)
    with torch.no_grad():  # move q away from the posterior: mean shifted, scales doubled
        vae.encoder.head.bias[:2] += 0.5
        vae.encoder.head.bias[2:] += math.log(2.0)
    x = torch.randn(40, 4, dtype=torch.float64) + b
    exact = exact_log_marginal(x, W, b).mean()
    gaps = []
    for k in (1, 10, 100, 3000):
        pyro.set_rng_seed(0)
        s = score(vae, x, num_samples=k, chunk_size=100)
        gaps.append(float(exact - s.log_likelihood.mean()))
        assert float(s.log_likelihood.mean()) >= float(s.elbo.mean()) - 1e-9
    # E[log p_K] increases with K towards log p(x) (Burda et al. 2016): the gap shrinks from
    # about 1 nat at K=1 to a few hundredths at K=3000 (tolerance: 3% of the K=1 gap).
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert abs(gaps[3]) < 0.03 * gaps[0], gaps


def test_estimate_is_the_logsumexp_of_unequal_weights_and_converges_per_point():
    r"""q away from the posterior, so the weights differ (their sd is > 1 nat here): the estimate
    must be :math:`\operatorname{logsumexp}_k \log w_k - \log K` of exactly the weights
    :func:`log_weights` draws (same seed, one chunk per batch; float64, 1e-10), not their mean
    (the ELBO, ~3 nats lower here) nor a plain sum. With K = 20,000 every point's estimate lies
    within 5 standard errors of the closed-form :math:`\log p(x)`, the standard error being the
    delta-method one, :math:`\sqrt{\mathrm{Var}(w / \bar w) / K}` (~0.01 nats here), measured on
    an independent draw of K weights, plus the estimator's bias :math:`\approx \mathrm{Var}(w /
    \bar w) / (2K)`."""
    vae, W, b = linear_gaussian_vae(exact_posterior_mean=True)
    with torch.no_grad():  # move q away from the posterior: mean shifted, scales doubled
        vae.encoder.head.bias[:2] += 0.5
        vae.encoder.head.bias[2:] += math.log(2.0)
    x = torch.randn(6, 4, dtype=torch.float64) + b
    pyro.set_rng_seed(11)
    with torch.no_grad():
        lw = log_weights(vae.model, vae.guide, x, 64)  # (64, 6)
    assert float(lw.std(0).min()) > 1.0  # unequal weights: a mean would not do
    pyro.set_rng_seed(11)
    s = score(vae, x, num_samples=64, chunk_size=64)
    by_hand = torch.logsumexp(lw, 0) - math.log(64)
    torch.testing.assert_close(s.log_likelihood, by_hand, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.elbo, lw.mean(0), rtol=0, atol=1e-10)
    assert bool((s.log_likelihood > s.elbo + 1.0).all())  # Jensen's gap is real here
    k = 20_000
    exact = exact_log_marginal(x, W, b)
    big = score(vae, x, num_samples=k, chunk_size=2000)
    with torch.no_grad():
        lw = log_weights(vae.model, vae.guide, x, k)
    rel_var = (lw - torch.logsumexp(lw, 0) + math.log(k)).exp().var(0)  # Var(w / mean w)
    se, bias = (rel_var / k).sqrt(), rel_var / (2 * k)
    assert bool(((big.log_likelihood - exact).abs() < 5 * se + bias).all()), (
        big.log_likelihood - exact, se)


def test_summary_standard_error_is_sd_over_sqrt_n():
    r"""``log_likelihood_se`` is the standard error of the mean over the N points,
    :math:`\mathrm{sd}/\sqrt{N}` with the sample sd (N - 1), computed here by hand; with N = 400
    it is 20 times smaller than sd and 20 times larger than sd / N, so neither slips through."""
    ll = torch.linspace(-30.0, -10.0, 400, dtype=torch.float64) ** 2 / -20.0
    s = Scores(elbo=ll - 1.0, log_likelihood=ll, num_samples=5)
    n = len(ll)
    mean = sum(ll.tolist()) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in ll.tolist()) / (n - 1))
    summary = s.summary()
    assert summary["log_likelihood_se"] == pytest.approx(sd / math.sqrt(n), rel=1e-12)
    assert summary["log_likelihood"] == pytest.approx(mean, rel=1e-12)
    assert summary["elbo"] == pytest.approx(mean - 1.0, rel=1e-12)
    assert math.isnan(Scores(ll[:1], ll[:1], 5).summary()["log_likelihood_se"])  # one point


def test_k_one_log_likelihood_equals_the_elbo_sample():
    vae, _, _ = linear_gaussian_vae(exact_posterior_mean=False)
    s = score(vae, torch.randn(8, 4, dtype=torch.float64), num_samples=1, chunk_size=1)
    assert torch.allclose(s.elbo, s.log_likelihood)


def test_chunks_bound_memory_and_kl_scale_is_ignored(monkeypatch):
    vae, W, b = linear_gaussian_vae(exact_posterior_mean=True)
    x = torch.randn(16, 4, dtype=torch.float64) + b
    seen = []
    import ppl_vae.inference.scoring as ev

    def spy(model, guide, xb, k):
        seen.append(k)
        return log_weights(model, guide, xb, k)

    monkeypatch.setattr(ev, "log_weights", spy)
    vae.kl_scale = 0.1
    s = ev.score(vae, x, num_samples=1000, chunk_size=64)
    assert max(seen) == 64 and sum(seen) == 1000
    assert vae.kl_scale == 0.1  # restored
    exact = exact_log_marginal(x, W, b)
    assert torch.allclose(s.log_likelihood, exact, atol=1e-8)  # unscaled: exact, see above


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_sample_counts(bad):
    vae, _, _ = linear_gaussian_vae(exact_posterior_mean=True)
    with pytest.raises(ValueError, match="must be positive"):
        score(vae, torch.zeros(2, 4, dtype=torch.float64), num_samples=bad)


def test_elbo_matches_closed_form_gaussian_elbo():
    """Mean of log w over many samples vs the closed-form ELBO of the linear-Gaussian model."""
    vae, W, b = linear_gaussian_vae(exact_posterior_mean=False)
    x = torch.randn(5, 4, dtype=torch.float64) + b
    q = vae.encode(x).base_dist
    m, s2 = q.loc, q.scale**2  # (5, 2)
    # E_q[log N(x; Wz + b, sigma^2 I)] + E_q[log N(z; 0, I)] + H[q]
    resid = x - (m @ W.T + b)
    e_lik = -0.5 * (resid**2).sum(-1) / SIGMA**2 - 0.5 * (s2 @ (W**2).sum(0)) / SIGMA**2
    e_lik = e_lik - 4 * (math.log(SIGMA) + 0.5 * math.log(2 * math.pi))
    e_prior = -0.5 * (m**2 + s2).sum(-1) - math.log(2 * math.pi)
    entropy = 0.5 * torch.log(2 * math.pi * math.e * s2).sum(-1)
    closed = e_lik + e_prior + entropy
    n = 20000
    s = score(vae, x, num_samples=n, chunk_size=2000)
    lw = torch.stack([log_weights(vae.model, vae.guide, x, 1).squeeze(0) for _ in range(200)])
    se = lw.std(0) / math.sqrt(n)
    # within 5 standard errors of the Monte Carlo mean
    assert bool(((s.elbo - closed).abs() <= 5 * se).all()), (s.elbo, closed, se)


# -- per-point ELBO terms ----------------------------------------------------------------------
def test_per_point_terms_match_the_closed_forms_of_a_linear_gaussian_vae():
    r"""With :math:`q(z \mid x) = N(m, \mathrm{diag}\, s^2)`, :math:`p(z) = N(0, I)` and
    :math:`p(x \mid z) = N(Wz + b, \sigma^2 I)`, by hand:

    .. math:: \mathbb{E}_q \log p(x \mid z) = \sum_j -\tfrac12 \log 2\pi\sigma^2
              - \frac{(x_j - (Wm + b)_j)^2 + \sum_d W_{jd}^2 s_d^2}{2\sigma^2},
              \qquad \mathrm{KL} = \sum_d -\log s_d + \tfrac12 (s_d^2 + m_d^2 - 1).

    K = 3000 draws in uneven chunks (7 points x 400 particles: 7 full particle chunks and one of
    200); the reconstruction term must be within 5 Monte Carlo standard errors of its closed
    form per point (sd of log p(x|z) under q, 20,000 draws, over sqrt(K)), the KL (analytic)
    within 1e-10."""
    from ppl_vae.inference.scoring import ChunkPlan, per_point_terms

    vae, W, b = linear_gaussian_vae(exact_posterior_mean=False)
    x = torch.randn(12, 4, dtype=torch.float64) + b
    with torch.no_grad():
        q = vae.encoder(x).base_dist
        m, s = q.loc, q.scale
        mean_x = m @ W.T + b
        recon = (
            -0.5 * math.log(2 * math.pi * SIGMA**2)
            - ((x - mean_x) ** 2 + (s**2) @ (W**2).T) / (2 * SIGMA**2)
        ).sum(-1)
        kl = (-torch.log(s) + 0.5 * (s**2 + m**2 - 1.0)).sum(-1)
        z = m + s * torch.randn(20_000, *m.shape, dtype=m.dtype)
        lp = torch.distributions.Normal(z @ W.T + b, SIGMA).log_prob(x).sum(-1)
        sd = lp.std(0)
    k = 3000
    pyro.set_rng_seed(3)
    terms = per_point_terms(vae, x, num_samples=k, plan=ChunkPlan(particles=400, points=7))
    assert terms.analytic == {"z": True} and terms.num_samples == k
    torch.testing.assert_close(terms.kl["z"], kl, atol=1e-10, rtol=0)
    err = (terms.recon - recon).abs()
    assert bool((err < 5 * sd / math.sqrt(k)).all()), (err, sd / math.sqrt(k))


class _MaskedPair(torch.nn.Module):
    """z ~ N(0, 1), x ~ N(z, 1), q(z|x) = N(x / 2, 0.8), with the points where ``keep`` is
    False masked out of both sites (poutine.mask); a global latent g ~ N(0, 1) outside the data
    plate comes first."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def model(self, x):
        pyro.sample("g", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], dim=-1), pyro.poutine.mask(mask=self.keep):
            z = pyro.sample("z", pyro.distributions.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)

    def guide(self, x):
        pyro.sample("g", pyro.distributions.Normal(0.3, 1.0))
        with pyro.plate("data", x.shape[0], dim=-1), pyro.poutine.mask(mask=self.keep):
            pyro.sample("z", pyro.distributions.Normal(x / 2, 0.8))


def test_per_point_terms_mask_points_and_leave_out_global_latents():
    r"""Masked points have no terms (exactly 0); kept points have the closed forms
    (:math:`\mathbb{E}_q \log N(x; z, 1) = -\tfrac12 \log 2\pi - ((x - x/2)^2 + 0.64) / 2`, 5
    standard errors at K = 4000; :math:`\mathrm{KL}(N(x/2, 0.8) \| N(0, 1))` to 1e-6); the
    global latent g, outside the data plate, has no per-point KL, and the local site after it is
    still reported."""
    from ppl_vae.inference.scoring import per_point_terms

    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    keep = torch.tensor([True, False, True, False])
    k = 4000
    terms = per_point_terms(_MaskedPair(keep), x, num_samples=k)
    assert set(terms.kl) == {"z"} and terms.analytic == {"z": True}
    assert bool((terms.recon[~keep] == 0).all()) and bool((terms.kl["z"][~keep] == 0).all())
    s = 0.8
    recon = -0.5 * math.log(2 * math.pi) - ((x / 2) ** 2 + s**2) / 2
    kl = -math.log(s) + 0.5 * (s**2 + (x / 2) ** 2 - 1.0)
    torch.testing.assert_close(terms.kl["z"][keep], kl[keep], atol=1e-6, rtol=0)
    # sd of -(x - z)^2 / 2 with z ~ N(x/2, s^2): (x/2 - z) ~ N(0, s^2) shifted by x/2
    u = x / 2 + s * torch.randn(20_000, 4)
    sd = (0.5 * u**2).std(0)
    err = (terms.recon - recon).abs()[keep]
    assert bool((err < 5 * sd[keep] / math.sqrt(k)).all()), (err, sd / math.sqrt(k))
