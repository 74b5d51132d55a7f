"""Every shipped prior, through the engine: shapes, devices, each estimator, evaluation.

A new prior is tested by adding one line to ``CATALOGUE``.
"""

from __future__ import annotations

import contextlib
import math

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
