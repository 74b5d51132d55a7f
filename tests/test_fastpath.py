r"""The fast training loss equals Pyro's ELBO loss: same value, same gradients, same fallbacks.

For every estimator the fast path serves (``trace``, ``meanfield``) and every shipped prior and
likelihood, one step of :class:`~ppl_vae.inference.fastpath.FastELBOLoss` and one step of
``elbo.differentiable_loss(vae.model, vae.guide, x)`` are taken from the same parameters with the
same seed (``pyro.set_rng_seed``), so both draw the same :math:`z`.

Tolerances. **Gradients must be bitwise equal** (``torch.equal``): the fast path repeats Pyro's
operations in Pyro's order. **Values** may differ by float32 rounding only: Pyro adds its three
float32 sums in float64 (``torch_item``) and rounds once, the fast path adds them in float32, so
they agree to a few units in the last place: ``rtol=1e-6`` (float32's epsilon is 1.2e-7) plus
``atol=1e-5`` for values near zero.

The batch has 6 points and ``kl_scale`` is 0.7: Pyro's plate multiplies and divides the site
scale by the batch size, which is not exact in floating point for such numbers, so the test
sees whether the fast path scales exactly as Pyro does.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.components import available
from ppl_vae.inference.estimators import estimator_names, make_elbo
from ppl_vae.inference.fastpath import FastELBOLoss, build_loss, served_estimator
from ppl_vae.models.distributions.family import MirrorFamily, VariationalFamily
from ppl_vae.models.priors.base import Prior
from ppl_vae.vae import VAE, build_vae

DATA_DIM = 12
LATENT_DIM = 3
BATCH = 6
KL_SCALE = 0.7
SEED = 7
PRIORS = [p for p in available("prior") if p != "class-conditional"]  # p(z|y): M2 only
LIKELIHOODS = available("likelihood")
SERVED = ("trace", "meanfield")
#: Priors whose p(z) is a MixtureSameFamily (only allclose under vectorised particles).
MIXTURES = ("mixture", "vamp")
PARTICLES = [(1, False), (3, False), (3, True)]  # (num_particles, vectorize_particles)


def make_vae(prior: object, likelihood: str, device: torch.device) -> VAE:
    """A small VAE from catalogue names; every component with its default options."""
    torch.manual_seed(0)
    vae = build_vae(
        (DATA_DIM,),
        prior=prior,
        likelihood=likelihood,
        latent_dim=LATENT_DIM,
        hidden_dims=(16,),
        network="mlp",
        num_levels=17,
    ).to(device)
    vae.kl_scale = KL_SCALE
    return vae


@torch.no_grad()
def data_for(vae: VAE) -> torch.Tensor:
    """Data in the likelihood's support: drawn from the model itself."""
    z = vae.prior().sample((BATCH,))
    return vae.decode(z).sample()


def one_step(vae: VAE, loss_fn, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of one step from the current parameters with seed ``SEED``."""
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(SEED)
    loss = loss_fn(x)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in vae.named_parameters()}
    return loss.detach(), grads


def assert_same_step(vae: VAE, fast, elbo, x: torch.Tensor, exact: bool = True) -> None:
    steps_before = fast.steps["fast"]
    value_fast, grads_fast = one_step(vae, fast, x)
    assert fast.steps["fast"] == steps_before + 1, "the fast path was not taken"
    value_pyro, grads_pyro = one_step(
        vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x
    )
    torch.testing.assert_close(value_fast, value_pyro, rtol=1e-6, atol=1e-5)
    assert grads_fast.keys() == grads_pyro.keys()
    for name, g in grads_pyro.items():
        if g is None:
            assert grads_fast[name] is None, name
        elif exact:
            assert torch.equal(grads_fast[name], g), f"gradient of {name} differs"
        else:  # float32 rounding of a reduction in another order: 1e-6 of the largest entry
            err = float((grads_fast[name] - g).abs().max())
            assert err <= 1e-6 * float(g.abs().max()) + 1e-12, f"gradient of {name}: {err}"


def switched_on(vae: VAE, spec: str, num_particles: int = 1, vectorize: bool = False):
    elbo = make_elbo(spec, num_particles, vectorize, max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    assert isinstance(loss, FastELBOLoss)
    x = data_for(vae)
    loss(x)  # the first step runs Pyro's ELBO (validated) and decides
    assert loss.fast, loss.reason
    assert loss.steps == {"fast": 1, "pyro": 1}  # decided, then the fast value of the same draws
    return elbo, loss, x


@pytest.mark.filterwarnings("ignore:meanfield. no KL is registered:UserWarning")  # mixtures, flows
@pytest.mark.parametrize("estimator", SERVED)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_fast_loss_equals_pyro_for_every_prior_and_likelihood(prior, likelihood, estimator, device):
    vae = make_vae(prior, likelihood, device)
    elbo, loss, x = switched_on(vae, estimator)
    assert_same_step(vae, loss, elbo, x)
    # the fast step switched validation off only for itself
    assert pyro.infer.is_validation_enabled()
    assert torch.distributions.Distribution._validate_args


@pytest.mark.filterwarnings("ignore:meanfield. no KL is registered:UserWarning")  # mixtures, flows
@pytest.mark.parametrize("num_particles, vectorize", PARTICLES[1:])
@pytest.mark.parametrize("estimator", SERVED)
@pytest.mark.parametrize("prior", PRIORS)
def test_fast_loss_equals_pyro_with_particles(prior, estimator, num_particles, vectorize, device):
    vae = make_vae(prior, "bernoulli", device)
    elbo, loss, x = switched_on(vae, estimator, num_particles, vectorize)
    # A mixture prior's backward under Pyro's vectorised particle plate accumulates over the
    # expanded components in another order (measured: 1.4e-7 and 2.3e-7 of the largest entry).
    exact = not (vectorize and prior in MIXTURES)
    assert_same_step(vae, loss, elbo, x, exact=exact)


@pytest.mark.parametrize("estimator", SERVED)
def test_kl_scale_is_respected(estimator, device):
    vae = make_vae("gaussian", "bernoulli", device)
    elbo, loss, x = switched_on(vae, estimator)
    values = {}
    for beta in (1.0, 0.3, 0.15):
        vae.kl_scale = beta
        assert_same_step(vae, loss, elbo, x)
        pyro.set_rng_seed(SEED)
        values[beta] = float(loss(x).detach())
    # same draws: the loss is affine in beta, -(log p(x|z) - beta * KL-term)
    slope_low = (values[0.3] - values[0.15]) / 0.15
    slope_high = (values[1.0] - values[0.3]) / 0.7
    assert slope_low == pytest.approx(slope_high, rel=1e-4)  # float32 differences of ~1e2 values
    assert abs(slope_low) > 1e-3
    # a non-positive weight is not the fast path's to interpret: the step goes to Pyro
    vae.kl_scale = 0.0
    pyro_steps = loss.steps["pyro"]
    with pytest.raises(ValueError, match="scale > 0"):
        loss(x)
    assert loss.steps["pyro"] == pyro_steps + 1


def test_training_is_identical_with_and_without_the_fast_path():
    """Ten Adam steps: bitwise equal gradients give bitwise equal parameters."""
    x_all = torch.bernoulli(
        torch.full((40, DATA_DIM), 0.3), generator=torch.Generator().manual_seed(1)
    )
    params = []
    for fast in (True, False):
        vae = make_vae("gaussian", "bernoulli", torch.device("cpu"))
        loss_fn = build_loss(make_elbo("trace"), vae, fast=fast)
        assert isinstance(loss_fn, FastELBOLoss) == fast
        opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
        pyro.set_rng_seed(SEED)
        for step in range(10):
            opt.zero_grad(set_to_none=True)
            loss_fn(x_all[4 * step : 4 * step + BATCH]).backward()
            opt.step()
        params.append([p.detach().clone() for p in vae.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))


@pytest.mark.parametrize("spec", [n for n in estimator_names() if n not in SERVED and n != "enum"])
def test_other_estimators_use_pyro(spec, device):
    vae = make_vae("gaussian", "bernoulli", device)
    elbo = make_elbo(spec, max_plate_nesting=1)
    assert served_estimator(elbo) is None
    loss = build_loss(elbo, vae)
    assert not isinstance(loss, FastELBOLoss)
    x = data_for(vae)
    a, _ = one_step(vae, loss, x)
    b, _ = one_step(vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x)
    assert torch.equal(a, b)


def test_enum_uses_pyro():
    """``enum`` (not run here: it warns on a model with nothing to enumerate) is not served."""
    vae = make_vae("gaussian", "bernoulli", torch.device("cpu"))
    assert not isinstance(build_loss(make_elbo("enum"), vae), FastELBOLoss)


def test_a_vae_that_redefines_its_programs_uses_pyro():
    class OtherVAE(VAE):
        def model(self, x: torch.Tensor) -> torch.Tensor:
            return super().model(x)

    vae = make_vae("gaussian", "bernoulli", torch.device("cpu"))
    other = OtherVAE(vae.prior, vae.likelihood, vae.encoder, vae.decoder)
    assert not isinstance(build_loss(make_elbo("trace"), other), FastELBOLoss)
    assert not isinstance(build_loss(make_elbo("trace"), vae, fast=False), FastELBOLoss)


def test_guide_without_rsample_keeps_pyro(device):
    """Spike-and-slab's guide samples exactly (no rsample) in eval mode: score function, Pyro."""
    vae = make_vae("spike-and-slab", "bernoulli", device).eval()
    elbo = make_elbo("trace", max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    x = data_for(vae)
    loss(x)
    assert loss.fast is False
    assert "no rsample" in loss.reason
    a, _ = one_step(vae, loss, x)
    b, _ = one_step(vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loss.steps == {"fast": 0, "pyro": 2}


def test_a_step_whose_guide_lost_rsample_goes_to_pyro(device):
    """Switched on in train mode; an eval-mode step (exact sampler) is sent to Pyro."""
    vae = make_vae("spike-and-slab", "bernoulli", device)
    elbo, loss, x = switched_on(vae, "trace")
    vae.eval()
    a, _ = one_step(vae, loss, x)
    b, _ = one_step(vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loss.steps == {"fast": 1, "pyro": 2}  # the switching step, then the eval step
    vae.train()
    assert_same_step(vae, loss, elbo, x)


class StudentTPrior(Prior):
    r"""Student-t prior with 4 degrees of freedom: no KL is registered for Student-t pairs.

    .. math:: p(z) = \prod_d t_4(z_d;\, 0, 1)
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__(latent_dim)
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.StudentT(4.0, self.loc, torch.ones_like(self.loc)).to_event(1)

    def guide_family(self) -> VariationalFamily:
        return MirrorFamily(dist.StudentT, fixed={"df": 4.0})


@pytest.mark.parametrize("num_particles, vectorize", PARTICLES)
def test_meanfield_monte_carlo_fallback(num_particles, vectorize, device):
    """No registered KL: Monte Carlo, like TraceMeanField_ELBO, warned about once (by Pyro)."""
    vae = make_vae(StudentTPrior(LATENT_DIM), "bernoulli", device)
    elbo = make_elbo("meanfield", num_particles, vectorize, max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    x = data_for(vae)
    with pytest.warns(UserWarning, match="Monte Carlo"):
        loss(x)
    assert loss.fast, loss.reason
    assert_same_step(vae, loss, elbo, x)  # warnings are errors here: no second warning
