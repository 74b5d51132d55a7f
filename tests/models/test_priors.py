"""Every shipped prior, through the engine: shapes, devices, each estimator, evaluation.

A new prior is tested by adding one line to ``CATALOGUE``.
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pytest
import torch

from ppl_vae import ConfigError, build_vae, estimator_names, make_elbo, score
from ppl_vae.components import available
from ppl_vae.inference.scoring import log_weights

#: prior name -> constructor options used here.
CATALOGUE: dict[str, dict] = {
    "gaussian": {},
    "von-mises": {"concentration": 2.0},
    "spike-and-slab": {"alpha": 0.3},
    "mixture": {"num_components": 3},
    "flow": {"num_flows": 2},
    "vamp": {"num_components": 4},
    "class-conditional": {},  # p(z | y): tested in M2 (tests/test_ssl.py), refused here
}

#: Priors of the label, p(z | y): only models with labels take them.
LABEL_CONDITIONAL = {"class-conditional"}
VAE_PRIORS = sorted(set(CATALOGUE) - LABEL_CONDITIONAL)

#: (prior, estimator) pairs that must refuse, with the reason in the message.
REFUSED = {
    # STL/DReG re-evaluate log q at detached samples; the relaxed spike-and-slab scores only its
    # own draws (which carry the gate and slab parts) and says so.
    ("spike-and-slab", "stl"),
    ("spike-and-slab", "dreg"),
}

#: Priors with no closed-form KL against their guide: ``meanfield`` says it uses Monte Carlo.
MONTE_CARLO_KL = {"mixture", "flow", "vamp"}


def test_catalogue_lists_every_shipped_prior():
    assert set(available("prior")) == set(CATALOGUE)


def _vae(prior: str, latent_dim: int = 3):
    return build_vae(
        (64,),
        prior=prior,
        prior_args=CATALOGUE[prior],
        latent_dim=latent_dim,
        hidden_dims=(16,),
        likelihood="bernoulli",
    )


@pytest.mark.parametrize("prior", VAE_PRIORS)
def test_shapes_and_device(prior, device):
    vae = _vae(prior).to(device)
    x = torch.rand(5, 64, device=device).round()
    q = vae.encode(x)
    assert q.batch_shape == (5,) and q.event_shape == (3,)
    z = q.rsample()
    assert z.shape == (5, 3) and z.device.type == device.type
    assert vae.prior().event_shape == (3,)
    assert vae.prior.embed(z).shape == (5, vae.prior.embed_dim)
    assert vae.decode_mean(z).shape == (5, 64)


@pytest.mark.parametrize("estimator", estimator_names())
@pytest.mark.parametrize("prior", VAE_PRIORS)
def test_a_few_svi_steps_with_each_estimator(prior, estimator):
    torch.manual_seed(0)
    vae = _vae(prior)
    x = (torch.rand(32, 64) > 0.5).float()
    kwargs = {"strict_enumeration_warning": False} if estimator == "enum" else {}
    elbo = make_elbo(estimator, num_particles=2, **kwargs)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    if (prior, estimator) in REFUSED:
        with pytest.raises(ConfigError):
            elbo.differentiable_loss(vae.model, vae.guide, x)
        return
    losses = []
    warns = estimator == "meanfield" and prior in MONTE_CARLO_KL
    with pytest.warns(UserWarning, match="by Monte Carlo") if warns else contextlib.nullcontext():
        for _ in range(30):
            opt.zero_grad()
            loss = elbo.differentiable_loss(vae.model, vae.guide, x)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    grads = [p.grad for p in vae.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # 30 Adam steps on one fixed batch: the mean loss of the last 5 is below the first 5's.
    assert sum(losses[-5:]) < sum(losses[:5])


def _log_mean_exp_and_se(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log of the mean of exp(lw) over dim 0, its delta-method SE and bias (both in nats)."""
    k = lw.shape[0]
    est = torch.logsumexp(lw, 0) - math.log(k)
    rel_var = (lw - est).exp().var(0)  # Var(w / mean w)
    return est, (rel_var / k).sqrt(), rel_var / (2 * k)


@pytest.mark.parametrize("prior", VAE_PRIORS)
def test_importance_sampled_evaluation(prior):
    r"""The guide-proposal estimate of :math:`\log p(x)` against an independent one that never
    touches the guide: :math:`\log \frac1S \sum_s p(x \mid z_s)`, :math:`z_s \sim p(z)`. On an
    untrained VAE the decoder barely depends on z, so the prior is a good proposal (S = 20,000;
    SE ~0.01 nats). Per point, the two must agree within 5 combined standard errors (delta
    method: :math:`\sqrt{\mathrm{Var}(w/\bar w)/K}`, the guide side's from an independent draw
    of its K = 2,000 weights) plus both biases (:math:`\mathrm{Var}(w/\bar w)/(2K)`). A wrong
    log-density of q (a normaliser, a log-det, the mirrored family) shifts every point's estimate
    and fails this."""
    vae = _vae(prior)
    x = (torch.rand(20, 64) > 0.5).float()
    k = 2000
    s = score(vae, x, num_samples=k, chunk_size=500)
    assert torch.isfinite(s.log_likelihood).all() and torch.isfinite(s.elbo).all()
    with torch.no_grad():
        _, se_q, bias_q = _log_mean_exp_and_se(log_weights(vae.model, vae.guide, x, k))
        z = vae.prior().sample((20_000, len(x)))  # (S, N, D)
        ref, se_p, bias_p = _log_mean_exp_and_se(vae.decode(z).log_prob(x))
    tol = 5 * (se_q**2 + se_p**2).sqrt() + bias_q + bias_p
    assert bool(((s.log_likelihood - ref).abs() < tol).all()), (s.log_likelihood - ref, tol)
    # Jensen per point (holds for any weights; here next to the check above)
    assert bool((s.log_likelihood >= s.elbo - 1e-5).all())


@pytest.mark.parametrize("prior", sorted(LABEL_CONDITIONAL))
def test_a_prior_of_the_label_is_refused_by_a_model_without_labels(prior):
    with pytest.raises(ConfigError, match=r"is p\(z \| y\), conditioned on the label"):
        _vae(prior)


def _catalogue_prior(prior: str):
    """The prior as a model holds it, in float64: a VAE's, or for p(z | y) an SSVAE's (3
    classes). (The model is converted: the VampPrior reads the model's encoder.)"""
    if prior in LABEL_CONDITIONAL:
        from ppl_vae.ssl import build_ssvae

        model = build_ssvae((64,), 3, prior=prior, prior_args=CATALOGUE[prior], latent_dim=3,
                            hidden_dims=(16,), label_guide="enumerate", network="mlp")  # fmt: skip
        return model.double().prior
    return _vae(prior).double().prior


@pytest.mark.parametrize("validate", [False, True])
@pytest.mark.parametrize("prior", sorted(CATALOGUE))
def test_log_density_is_the_log_prob_of_the_prior(prior, validate):
    r"""``Prior.log_density`` (how the M2 fast path scores p(z)) against ``forward().log_prob``
    for every shipped prior, in float64 to ``1e-12``: an override may compute the same value
    another way (the standard Gaussian sums before scaling), which moves only the rounding. On
    codes of batch ``(2, 5)`` (the enumerated term's ``(K, N)``) and with gradients."""
    p = _catalogue_prior(prior)
    torch.manual_seed(0)
    z = (1.5 * torch.randn(2, 5, 3, dtype=torch.float64)).requires_grad_()
    if prior == "von-mises":  # angles
        z = (z.detach() % (2 * math.pi) - math.pi).requires_grad_()
    if prior == "spike-and-slab":  # its support: the codes its own draws take
        z = p().sample((2, 5)).requires_grad_()
    labels = ()
    if prior in LABEL_CONDITIONAL:
        labels = (torch.eye(3, dtype=torch.float64)[torch.tensor([0, 1, 2, 0, 1])],)
    z2 = z.detach().clone().requires_grad_()  # its own graph (a flow caches its inverses)
    with pyro.validation_enabled(validate):
        got = p.log_density(z, *labels)
        want = p(*labels).log_prob(z2)
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), z)
    (g_want,) = torch.autograd.grad(want.sum(), z2)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_the_standard_gaussian_log_density_against_scipy_without_building_p():
    r"""The fixed N(0, I) prior's :math:`\log p(z)` is scipy's ``norm.logpdf`` summed over the
    codes, with gradient :math:`-z`, and is computed without :meth:`forward` while
    distributions do not validate; a moved buffer gives that normal's density."""
    from scipy.stats import norm

    from ppl_vae.models.priors.gaussian import GaussianPrior

    p = GaussianPrior(4).double()
    torch.manual_seed(1)
    z = (3 * torch.randn(7, 4, dtype=torch.float64)).requires_grad_()
    with pyro.validation_enabled(False):
        p.forward = None  # not called: the closed form alone
        got = p.log_density(z)
        del p.forward
    want = torch.from_numpy(norm.logpdf(z.detach().numpy()).sum(-1))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    (grad,) = torch.autograd.grad(got.sum(), z)
    torch.testing.assert_close(grad, -z.detach(), rtol=0, atol=1e-15)
    with pyro.validation_enabled(True):  # the distribution's support check: NaN is refused
        with pytest.raises(ValueError, match="support"):
            p.log_density(torch.full((1, 4), math.nan, dtype=torch.float64))
    with torch.no_grad():
        p.loc.fill_(0.5)  # an in-place write: no longer the standard normal
    with pyro.validation_enabled(False):
        got = p.log_density(z.detach())
    want = torch.from_numpy(norm.logpdf(z.detach().numpy(), loc=0.5).sum(-1))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
