"""The mixture, flow and VampPrior priors and the default guide family, against computations
by hand (closed forms, autograd Jacobians), not against their own code."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from ppl_vae import ConfigError, build_vae, fit
from ppl_vae.models.distributions.family import NormalOnSupport, family_for
from ppl_vae.models.priors.base import Prior
from ppl_vae.models.priors.flow import FlowPrior
from ppl_vae.models.priors.mixture import MixturePrior

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _normal_log_density(z, loc, scale):
    """log N(z; loc, scale^2) summed over the last dim, written out."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI).sum(-1)


def test_vamp_prior_density_is_the_mixture_of_posteriors_at_the_pseudo_inputs():
    torch.manual_seed(0)
    vae = build_vae((12,), prior="vamp", prior_args={"num_components": 5}, latent_dim=3,
                    hidden_dims=(8,))  # fmt: skip
    prior, enc = vae.prior, vae.encoder
    z = torch.randn(7, 3)
    params = enc.params(prior.pseudo_inputs)  # loc, scale: (K, D)
    per_k = _normal_log_density(z[:, None, :], params["loc"], params["scale"])  # (7, K)
    by_hand = torch.logsumexp(per_k, -1) - math.log(5)
    assert torch.allclose(prior().log_prob(z), by_hand, atol=1e-5)
    # the prior sees the model: moving the encoder moves p(z)
    with torch.no_grad():
        enc.head.bias.add_(0.5)
    assert not torch.allclose(prior().log_prob(z), by_hand, atol=1e-3)


def test_vamp_pseudo_inputs_start_at_training_points_and_reopen_exactly(tmp_path):
    from ppl_vae.runs import load_run

    out = tmp_path / "run"
    result = fit(prior="vamp", prior_args={"num_components": 6}, latent_dim=2, epochs=1,
                 max_train=200, hidden_dims=[16], log_likelihood_samples=4, out=out,
                 quiet=True)  # fmt: skip
    u = result.model.prior.pseudo_inputs.detach()
    assert u.shape == (6, 64)
    run = load_run(out)
    assert torch.equal(run.model.prior.pseudo_inputs.detach(), u)
    # one epoch of Adam at lr 1e-3 moves each pseudo-input by less than 0.2 per pixel from the
    # training point it started at; random starts (uniform on [0, 1]) are about 5 grey levels
    # from every digit pixel on average
    train = result.dataset.train_x
    dist_to_nearest = torch.cdist(u, train).min(1).values / math.sqrt(64)
    assert float(dist_to_nearest.max()) < 0.2, dist_to_nearest


def test_vamp_prior_refuses_an_encoder_that_also_reads_the_label():
    from ppl_vae.ssl import build_ssvae

    with pytest.raises(ConfigError, match="needs an encoder of x alone"):
        build_ssvae((64,), 10, prior="vamp", latent_dim=2, hidden_dims=(8,))


def test_mixture_prior_density_by_hand():
    torch.manual_seed(1)
    prior = MixturePrior(2, num_components=3)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.3, -1.0, 0.5]))
    z = torch.randn(5, 2)
    log_w = torch.log_softmax(prior.logits.detach(), -1)
    per_k = _normal_log_density(z[:, None, :], prior.loc, prior.scale)
    by_hand = torch.logsumexp(log_w + per_k, -1)
    assert torch.allclose(prior().log_prob(z), by_hand, atol=1e-6)
    assert prior.summary(z)["components_perplexity"] == pytest.approx(
        float((-(log_w.exp() * log_w).sum()).exp()), rel=1e-6
    )


@pytest.mark.parametrize(
    ("flow", "dtype", "tol"),
    [
        ("affine-autoregressive", torch.float32, 1e-5),
        # float64: in float32 the spline's closed-form inverse loses up to 1e-5 in u, which moves
        # log p(f(u)) by up to 1.6e-4 (torch 2.14); in float64 both sides agree to 1e-13.
        ("spline-coupling", torch.float64, 1e-9),
    ],
)
def test_flow_prior_log_density_against_autograds_jacobian(flow, dtype, tol):
    r"""log p(z) = log N(u) - log|det df/du| at z = f(u), the Jacobian from autograd, never from
    the transforms' own log-determinants; f^{-1}(f(u)) = u."""
    torch.manual_seed(2)
    prior = FlowPrior(3, flow=flow, num_flows=2, hidden_dims=[16])
    with torch.no_grad():  # away from the near-identity initialisation
        for p in prior.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prior = prior.to(dtype)
    transform = torch.distributions.ComposeTransform(prior.transforms())
    for u in (torch.randn(4, 3) * 0.8).to(dtype):
        jac = torch.autograd.functional.jacobian(lambda v: transform(v[None])[0], u).detach()
        z = transform(u[None])[0].detach()
        by_hand = (
            _normal_log_density(u, torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype))
            - torch.linalg.slogdet(jac).logabsdet
        )
        assert float(prior().log_prob(z[None])[0].detach()) == pytest.approx(
            float(by_hand), abs=tol
        )
        assert torch.allclose(transform.inv(z[None])[0].detach(), u, atol=10 * tol)


def test_flow_prior_refuses_one_dimension():
    with pytest.raises(ConfigError, match="latent_dim >= 2"):
        FlowPrior(1)


class _GammaMixture(Prior):
    def forward(self):
        return dist.MixtureSameFamily(
            dist.Categorical(logits=torch.zeros(2)),
            dist.Gamma(torch.ones(2, self.latent_dim), torch.ones(2, self.latent_dim)).to_event(1),
        )


class _DirichletPrior(Prior):
    def forward(self):
        return dist.MixtureSameFamily(
            dist.Categorical(logits=torch.zeros(2)), dist.Dirichlet(torch.ones(2, self.latent_dim))
        )


def test_a_prior_with_nothing_to_mirror_gets_a_normal_on_its_support():
    real = family_for(MixturePrior(2)(), "MixturePrior")
    assert isinstance(real, NormalOnSupport) and list(real.param_constraints) == ["loc", "scale"]
    fam = _GammaMixture(2).guide_family()  # positive support: a log-normal q
    loc, scale = torch.tensor([[0.2, -0.4]]), torch.tensor([[0.5, 1.5]])
    q = fam.build(loc=loc, scale=scale)
    z = q.sample((1000,))
    assert bool((z > 0).all())
    by_hand = (dist.Normal(loc, scale).log_prob(z.log()) - z.log()).sum(-1)  # log-normal density
    assert torch.allclose(q.log_prob(z), by_hand, atol=1e-5)
    # and it trains in a VAE with no guide code
    vae = build_vae((10,), prior=_GammaMixture, latent_dim=2, hidden_dims=(8,))
    assert isinstance(vae.encoder.family, NormalOnSupport)


def test_a_prior_on_a_support_with_no_elementwise_bijection_names_what_to_write():
    with pytest.raises(ConfigError, match=r"give _DirichletPrior a guide_family\(\)") as e:
        _DirichletPrior(3).guide_family()
    assert "\n" not in str(e.value)


def test_normal_on_support_is_the_engines_normal_on_the_real_line():
    from ppl_vae.models.distributions.normal import Normal

    q = NormalOnSupport(constraints.real).build(loc=torch.zeros(2, 3), scale=torch.ones(2, 3))
    assert isinstance(q.base_dist, Normal) and q.event_shape == (3,)
