"""Guide families (``--guide-family``): every shipped one through the engine, and the IAF's
density against autograd's Jacobian and an importance-sampling identity.

A new family is tested by adding one line to ``CATALOGUE``.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from ppl_vae import ConfigError, build_vae
from ppl_vae.cli import main
from ppl_vae.components import available
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.fastpath import FastELBOLoss, build_loss
from ppl_vae.inference.scoring import log_weights, score

#: family name -> constructor options used here.
CATALOGUE: dict[str, dict] = {
    "normal": {},
    "iaf": {"num_flows": 2, "hidden_dims": [12]},
}


def test_catalogue_lists_every_shipped_family():
    assert set(available("family")) == set(CATALOGUE)


def _vae(family: str, prior: str = "gaussian", latent_dim: int = 3):
    torch.manual_seed(0)
    return build_vae((12,), prior=prior, latent_dim=latent_dim, hidden_dims=(16,),
                     guide_family=family, guide_family_args=CATALOGUE[family])  # fmt: skip


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move the flows away from their near-identity initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("family", sorted(CATALOGUE))
@pytest.mark.parametrize("estimator", ["trace", "meanfield", "stl"])
def test_a_few_steps_with_each_estimator(family, estimator, recwarn):
    vae = _vae(family)
    x = (torch.rand(16, 12) > 0.5).float()
    elbo = make_elbo(estimator, num_particles=1)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    flow_grads = [p.grad for p in vae.encoder.family.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in flow_grads)
    assert sum(losses[-5:]) < sum(losses[:5])  # 25 Adam steps on one batch


@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("family", sorted(CATALOGUE))
@pytest.mark.parametrize("estimator", ["trace", "meanfield"])
@pytest.mark.filterwarnings("ignore:meanfield. no KL is registered:UserWarning")
def test_the_fast_path_serves_the_family_with_pyros_gradients(family, estimator, vectorize):
    vae = _vae(family)
    _perturb(vae.encoder.family)
    vae.kl_scale = 0.7
    elbo = make_elbo(estimator, 3 if vectorize else 1, vectorize, max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    assert isinstance(loss, FastELBOLoss)
    x = (torch.rand(6, 12) > 0.5).float()
    loss(x)
    assert loss.fast, loss.reason

    def step(fn):
        vae.zero_grad(set_to_none=True)
        pyro.set_rng_seed(5)
        value = fn(x)
        value.backward()
        return value.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}

    v_fast, g_fast = step(loss)
    v_pyro, g_pyro = step(lambda x: elbo.differentiable_loss(vae.model, vae.guide, x))
    torch.testing.assert_close(v_fast, v_pyro, rtol=1e-6, atol=1e-5)
    for name, g in g_pyro.items():
        assert torch.equal(g_fast[name], g), name


def test_iaf_log_density_against_autograds_jacobian():
    r"""log q(z_K|x) = log N(z_0; mu, sigma) - log|det dz_K/dz_0|, the Jacobian from autograd
    (never from the transforms' own log-determinants), at the guide's own draw z_K."""
    vae = _vae("iaf")
    _perturb(vae.encoder.family)
    family = vae.encoder.family
    x = (torch.rand(4, 12) > 0.5).float()
    params = vae.encoder.params(x)
    q = family.build(**params)
    z_k = q.rsample()
    log_q = q.log_prob(z_k).detach()
    for i in range(4):
        ctx = params["context"][i : i + 1]
        flow = torch.distributions.ComposeTransform(family.transforms(ctx))
        z0 = flow.inv(z_k[i : i + 1].detach())[0].detach()
        jac = torch.autograd.functional.jacobian(lambda v, f=flow: f(v[None])[0], z0).detach()
        loc, scale = params["loc"][i].detach(), params["scale"][i].detach()
        base = (-0.5 * ((z0 - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum()
        by_hand = base - torch.linalg.slogdet(jac).logabsdet
        assert float(log_q[i]) == pytest.approx(float(by_hand), abs=1e-4)


def test_iaf_steps_read_the_encoders_context():
    vae = _vae("iaf")
    _perturb(vae.encoder.family)
    family = vae.encoder.family
    p = vae.encoder.params((torch.rand(3, 12) > 0.5).float())
    z = torch.randn(3, 3)
    other = dict(p, context=p["context"] + 1.0)
    assert not torch.allclose(family.build(**p).log_prob(z), family.build(**other).log_prob(z))


def test_importance_sampled_log_likelihood_with_an_iaf_guide_matches_the_prior_proposal():
    """Same identity as the prior catalogue's: a wrong log q biases every point's estimate."""
    vae = _vae("iaf")
    _perturb(vae.encoder.family)
    x = (torch.rand(15, 12) > 0.5).float()
    s = score(vae, x, num_samples=2000, chunk_size=500)
    with torch.no_grad():
        lw = log_weights(vae.model, vae.guide, x, 2000)
        rel_q = (lw - torch.logsumexp(lw, 0) + math.log(2000)).exp().var(0)
        z = vae.prior().sample((20_000, len(x)))
        lp = vae.decode(z).log_prob(x)
        ref = torch.logsumexp(lp, 0) - math.log(20_000)
        rel_p = (lp - ref).exp().var(0)
    tol = 5 * (rel_q / 2000 + rel_p / 20_000).sqrt() + rel_q / 4000 + rel_p / 40_000
    assert bool(((s.log_likelihood - ref).abs() < tol).all()), (s.log_likelihood - ref, tol)


def test_a_family_that_does_not_fit_the_prior_is_refused_in_one_line(capsys):
    with pytest.raises(ConfigError, match="only its own guide family fits"):
        _vae("iaf", prior="von-mises")
    code = main(["fit", "--prior", "spike-and-slab", "--guide-family", "iaf", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "only its own guide family" in err and len(err.strip().splitlines()) == 1


def test_fit_records_the_family_and_reopens_it(tmp_path):
    from ppl_vae.runs import load_run

    out = tmp_path / "run"
    args = ["fit", "--guide-family", "iaf", "--guide-family-arg", "num_flows=3",
            "--latent-dim", "4", "--hidden-dims", "32", "--epochs", "1", "--max-train", "200",
            "--log-likelihood-samples", "4", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    run = load_run(out)
    assert type(run.model.encoder.family).__name__ == "IAFFamily"
    assert run.model.encoder.family.num_flows == 3
