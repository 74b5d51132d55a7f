"""models/distributions/normal.py: a Normal that scores its own draw from the noise.

At its own draw z = mu + sigma * eps, log q(z) = -eps^2/2 - log sigma - log(2 pi)/2 and the total
gradients are d/dmu = 0 and d/dsigma = -1/sigma; everything else is Pyro's Normal.
"""

from __future__ import annotations

import copy
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.kl import kl_divergence

from ppl_vae.models.distributions.family import MirrorFamily
from ppl_vae.models.distributions.normal import Normal, StandardNormal
from ppl_vae.models.priors.gaussian import GaussianPrior


def _params(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    loc = torch.randn(7, 5, generator=g, dtype=dtype).requires_grad_()
    scale = (0.3 + torch.rand(7, 5, generator=g, dtype=dtype)).requires_grad_()
    return loc, scale


def _elbo_grads(cls: type, sample_shape: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
    loc, scale = _params()
    pyro.set_rng_seed(11)
    q = cls(loc, scale)
    z = q.rsample(torch.Size(sample_shape))
    value = (q.log_prob(z) + 0.5 * z.square()).sum()  # log q(z) minus a standard-normal log p(z)
    return (value, *torch.autograd.grad(value, (loc, scale)))


def test_draws_are_pyros_bitwise() -> None:
    loc, scale = _params(torch.float32)
    pyro.set_rng_seed(0)
    ours = Normal(loc, scale).rsample(torch.Size([3]))
    pyro.set_rng_seed(0)
    theirs = dist.Normal(loc, scale).rsample(torch.Size([3]))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("sample_shape", [(), (4,)], ids=str)
def test_log_prob_at_own_draw_value_and_gradients(sample_shape: tuple[int, ...]) -> None:
    # Same estimator, different rounding: float64 values and total gradients agree to 1e-12.
    ours = _elbo_grads(Normal, sample_shape)
    theirs = _elbo_grads(dist.Normal, sample_shape)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradients_are_the_closed_form() -> None:
    # d/dmu sum log q(z(mu, sigma)) = 0 and d/dsigma = -1/sigma (the eps-terms cancel).
    loc, scale = _params()
    q = Normal(loc, scale)
    g_loc, g_scale = torch.autograd.grad(
        q.log_prob(q.rsample()).sum(), (loc, scale), materialize_grads=True
    )
    assert torch.equal(g_loc, torch.zeros_like(loc))
    torch.testing.assert_close(g_scale, -1 / scale.detach(), rtol=1e-14, atol=0)


def test_log_prob_value_at_draw_matches_formula_float32() -> None:
    loc, scale = _params(torch.float32)
    q = Normal(loc, scale)
    z = q.rsample()
    reference = dist.Normal(loc.double(), scale.double()).log_prob(z.double())
    torch.testing.assert_close(q.log_prob(z).double(), reference, rtol=1e-5, atol=1e-5)


def test_other_values_are_scored_by_the_parent() -> None:
    loc, scale = _params()
    q, parent = Normal(loc, scale), dist.Normal(loc, scale)
    z = q.rsample()
    x = torch.randn(7, 5, dtype=torch.float64)
    assert torch.equal(q.log_prob(x), parent.log_prob(x))
    assert torch.equal(q.log_prob(z.clone()), parent.log_prob(z))  # a copy is another value
    assert torch.equal(q.expand((2, 7, 5)).log_prob(z), parent.expand((2, 7, 5)).log_prob(z))


def test_in_place_change_of_the_draw_is_noticed() -> None:
    q = Normal(torch.zeros(4), torch.ones(4))
    z = q.rsample()
    z.add_(10.0)
    expected = -0.5 * z.square() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(q.log_prob(z), expected)


def test_inference_mode_draws_are_scored_by_the_parent() -> None:
    loc, scale = _params()
    with torch.inference_mode():
        q = Normal(loc, scale)
        z = q.rsample()
        assert torch.equal(q.log_prob(z), dist.Normal(loc, scale).log_prob(z))


def test_only_the_latest_draw_is_remembered() -> None:
    loc, scale = _params()
    q = Normal(loc, scale)
    z1 = q.rsample()
    z2 = q.rsample()
    parent = dist.Normal(loc, scale)
    assert torch.equal(q.log_prob(z1), parent.log_prob(z1))
    torch.testing.assert_close(q.log_prob(z2), parent.log_prob(z2), rtol=1e-12, atol=1e-12)


def test_registered_kl_and_copies() -> None:
    q = Normal(torch.tensor([0.5, -1.0]), torch.tensor([0.7, 2.0]))
    p = dist.Normal(torch.zeros(2), torch.ones(2))
    assert torch.equal(kl_divergence(q, p), kl_divergence(dist.Normal(q.loc, q.scale), p))
    q.rsample()
    for twin in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert type(twin) is Normal and twin._noise is None
        assert torch.equal(twin.loc, q.loc) and torch.equal(twin.scale, q.scale)


def test_gaussian_prior_guide_uses_it() -> None:
    family = GaussianPrior(3).guide_family()
    assert isinstance(family, MirrorFamily) and family.dist_cls is Normal
    q = family.build(loc=torch.zeros(2, 3), scale=torch.ones(2, 3))
    assert q.event_shape == (3,) and type(q.base_dist) is Normal


def test_family_bijections_follow_the_constraints() -> None:
    # The family builds biject_to(constraint) once per set of constraints, not once per call.
    family = MirrorFamily(dist.Normal)
    raw = torch.tensor([[0.5, -2.0, 1.0, 20.0]])
    first = family.constrain(raw, 2)
    assert family._bijections() is family._bijections()
    torch.testing.assert_close(first["loc"], raw[:, :2])
    torch.testing.assert_close(first["scale"], raw[:, 2:].clamp(max=15.0).exp())
    family.param_constraints["scale"] = torch.distributions.constraints.greater_than(1.0)
    shifted = family.constrain(raw, 2)["scale"]
    torch.testing.assert_close(shifted, 1.0 + raw[:, 2:].clamp(max=15.0).exp())


# -- StandardNormal: the fixed Gaussian prior ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_standard_normal_log_prob_is_normals_bitwise(dtype: torch.dtype) -> None:
    # Values from 1e-30 to 1e18 in magnitude (squares into the subnormals and past 1e36), and
    # the gradient with respect to the value: the same kernels' results, bit for bit.
    g = torch.Generator().manual_seed(5)
    mag = 10.0 ** (torch.rand(64, 3, generator=g, dtype=torch.float64) * 48 - 30)
    sign = torch.where(torch.rand(64, 3, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    z = (sign * mag).to(dtype)
    z = torch.cat([z, torch.randn(64, 3, generator=g, dtype=dtype)]).requires_grad_()
    zeros, ones = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    ours = StandardNormal(zeros, ones).to_event(1).log_prob(z)
    theirs = dist.Normal(zeros, ones).to_event(1).log_prob(z)
    assert torch.equal(ours, theirs)
    w = torch.randn(ours.shape, generator=g, dtype=dtype)
    (ga,) = torch.autograd.grad((ours * w).sum(), z)
    (gb,) = torch.autograd.grad((theirs * w).sum(), z)
    assert torch.equal(ga, gb)


def test_standard_normal_broadcasts_a_smaller_value_as_normal_does() -> None:
    p = StandardNormal(torch.zeros(4, 3), torch.ones(4, 3))
    z = torch.randn(3)
    assert torch.equal(p.log_prob(z), dist.Normal(torch.zeros(4, 3), 1.0).log_prob(z))
    assert p.log_prob(z).shape == (4, 3)


def test_the_gaussian_prior_is_standard_only_while_its_buffers_are() -> None:
    prior = GaussianPrior(3)
    assert type(prior().base_dist) is StandardNormal
    with torch.no_grad():
        prior.loc.fill_(0.5)  # written in place: checked again, and no longer standard
    d = prior()
    assert type(d.base_dist) is dist.Normal
    z = torch.randn(2, 3)
    assert torch.equal(d.log_prob(z), dist.Normal(0.5, 1.0).expand([3]).to_event(1).log_prob(z))
    prior.load_state_dict({"loc": torch.zeros(3), "scale": torch.ones(3)})
    assert type(prior().base_dist) is StandardNormal
    for learned in (GaussianPrior(3, learn_loc=True), GaussianPrior(3, learn_scale=True)):
        assert type(learned().base_dist) is dist.Normal
