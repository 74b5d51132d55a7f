"""The shipped hierarchical pairs (``models/pairs``): HierarchicalVAE (bottom-up) and LadderVAE.

Every objective is checked against an independent computation: with one stochastic layer both
are the built-in VAE (same networks, same Trace_ELBO to float rounding); the two-layer ELBO
equals a hand computation with ``torch.distributions``; the ladder's q(z_l | z_{l+1}, x) equals
the precision-weighted merge written in another algebraic form and moves with the generative
weights it shares.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributions as td
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch.nn import functional as F

from ppl_vae import ConfigError, fit
from ppl_vae.kinds.user import sample_from_model
from ppl_vae.models.distributions.family import RAW_CLAMP, MirrorFamily, base_distribution
from ppl_vae.models.distributions.von_mises import ReparameterizedVonMises
from ppl_vae.models.likelihoods.bernoulli import BernoulliLikelihood
from ppl_vae.models.pairs.hierarchical import HierarchicalVAE
from ppl_vae.models.pairs.ladder import LadderVAE
from ppl_vae.models.priors.base import Prior
from ppl_vae.models.priors.gaussian import GaussianPrior
from ppl_vae.models.priors.von_mises import VonMisesPrior
from ppl_vae.vae import VAE, build_networks

PAIRS = [HierarchicalVAE, LadderVAE]
SHAPE = (6,)


def make(cls, prior=None, **options):
    options = {"hidden_dims": [5], **options}
    prior = GaussianPrior(2) if prior is None else prior
    return cls(SHAPE, prior, BernoulliLikelihood(SHAPE), **options)


def binary(n: int) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, *SHAPE), 0.5))


def gaussian_head(layer, h: torch.Tensor, min_scale: float = 1e-3) -> tuple[torch.Tensor, ...]:
    """(loc, scale) of a hidden Gaussian layer, from its trunk and head by hand."""
    loc, raw = layer.head(layer.trunk(h)).chunk(2, -1)
    return loc, F.softplus(raw) + min_scale


# -- L = 1 is the built-in VAE -----------------------------------------------------------------
@pytest.mark.parametrize("cls", PAIRS)
@pytest.mark.parametrize(("prior_cls", "norm"), [(GaussianPrior, "none"), (VonMisesPrior, "none"),
                                                 (GaussianPrior, "batch")])  # fmt: skip
def test_one_layer_is_the_builtin_vae(cls, prior_cls, norm):
    """Same networks as build_networks makes, and the VAE sharing them has the same
    Trace_ELBO loss and gradients under the same seed (only float rounding may differ; the
    programs run the same operations, so 1e-6 relative is ample)."""
    prior = prior_cls(3)
    m = make(cls, prior, hidden_dims=[7, 5], activation="tanh", norm=norm)
    assert m.num_layers == 1 and m.sites == ["z1"]
    opts = {"activation": "tanh", "norm": norm}
    enc, dec = build_networks(
        SHAPE, 3, prior.embed_dim, prior.guide_family(), 1, (7, 5),
        encoder_args=opts, decoder_args=opts,
    )  # fmt: skip
    assert repr(enc) == repr(m.encoder) and repr(dec) == repr(m.decoder)
    vae = VAE(m.prior, m.likelihood, m.encoder, m.decoder)
    x = binary(9)
    losses, grads = [], []
    for program in (vae, m):
        pyro.set_rng_seed(3)
        loss = Trace_ELBO(num_particles=2).differentiable_loss(program.model, program.guide, x)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for g_pair, g_vae in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(g_pair, g_vae, rtol=1e-6, atol=1e-7)


# -- the two-layer ELBO by hand ----------------------------------------------------------------
def test_two_layer_elbo_equals_a_hand_computation():
    r"""log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1) on one guide draw,
    each term from the networks' outputs with torch.distributions (float32 sums of ~10 terms
    of a few nats: 1e-5 absolute is 100x their rounding)."""
    m = make(HierarchicalVAE, lower_latent_dims=[3], layer_hidden_dims=[4])
    x = binary(5)
    pyro.set_rng_seed(1)
    guide_trace = poutine.trace(m.guide).get_trace(x)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z2"]["value"]
    with torch.no_grad():
        q1 = td.Normal(*gaussian_head(m.encoder, x))
        raw = m.inference[0].head(m.inference[0].trunk(z1)).clamp(-RAW_CLAMP, RAW_CLAMP)
        loc, log_scale = raw.chunk(2, -1)
        q2 = td.Normal(loc, log_scale.exp())  # the prior's mirror family: exp onto scale > 0
        p2 = td.Normal(torch.zeros(2), torch.ones(2))
        p1 = td.Normal(*gaussian_head(m.generative[0], z2))
        logits = m.decoder.net(z1)
        px = td.Bernoulli(logits=logits)
        hand = (
            px.log_prob(x).sum()
            + p1.log_prob(z1).sum()
            + p2.log_prob(z2).sum()
            - q1.log_prob(z1).sum()
            - q2.log_prob(z2).sum()
        )
        replayed = poutine.trace(poutine.replay(m.model, trace=guide_trace)).get_trace(x)
        elbo = replayed.log_prob_sum() - guide_trace.log_prob_sum()
        pyro.set_rng_seed(1)  # the same draw inside Trace_ELBO
        loss = Trace_ELBO().loss(m.model, m.guide, x)
    torch.testing.assert_close(elbo, hand, rtol=0, atol=1e-5)
    assert abs(-loss - float(hand)) < 1e-5


@pytest.mark.parametrize("cls", PAIRS)
def test_batch_norm_before_every_hidden_activation_and_running_statistics_in_eval(cls):
    """``norm="batch"`` puts one batch normalisation before each of the 2 + 2 + 1 + 1 hidden
    activations (x <-> z1 both ways, z1 <-> z2 both ways); in eval mode a point's posterior
    does not depend on the other points of its batch, in training mode it does (the guide's
    first site, which no draw precedes: z1 bottom-up, z2 top-down)."""
    from ppl_vae.models.decoders.base import FlatBatchNorm1d

    m = make(cls, hidden_dims=[7, 5], lower_latent_dims=[3], layer_hidden_dims=[4], norm="batch")
    norms = [mod for mod in m.modules() if isinstance(mod, FlatBatchNorm1d)]
    assert sorted(n.num_features for n in norms) == [4, 4, 5, 5, 7, 7]
    plain = make(cls, hidden_dims=[7, 5], lower_latent_dims=[3], layer_hidden_dims=[4])
    assert not any(isinstance(mod, FlatBatchNorm1d) for mod in plain.modules())
    x, first = binary(8), "z1" if cls is HierarchicalVAE else "z2"
    with torch.no_grad():
        m.train()
        m.guide(x)  # moves the running statistics away from their start
        for train in (True, False):
            m.train(train)
            whole = poutine.trace(m.guide).get_trace(x).nodes[first]["fn"]
            alone = poutine.trace(m.guide).get_trace(x[:2]).nodes[first]["fn"]
            same = torch.allclose(whole.mean[:2], alone.mean, rtol=0, atol=1e-6)
            assert same is not train


# -- the ladder's top-down posterior -----------------------------------------------------------
def test_ladder_posterior_is_the_precision_weighted_merge_of_the_shared_generative_layer():
    """q(z1 | z2, x) has mean mu_p + (mu_hat - mu_p) s_p^2 / (s_p^2 + s_hat^2) and variance
    s_hat^2 s_p^2 / (s_hat^2 + s_p^2) (the formula rearranged, computed here from the networks'
    outputs), q(z2 | x) is the top head's, and changing a weight of the *generative* layer
    p(z1 | z2) changes q(z1 | .) accordingly while q(z2 | x) stays. Float32: 1e-5."""
    m = make(LadderVAE, lower_latent_dims=[3], layer_hidden_dims=[4])
    x = binary(5)

    def guide_and_hand(seed: int) -> tuple:
        pyro.set_rng_seed(seed)
        trace = poutine.trace(m.guide).get_trace(x)
        z2 = trace.nodes["z2"]["value"]
        with torch.no_grad():
            d1 = m.encoder.trunk(x)
            mu_hat, s_hat = gaussian_head(m.encoder, x)
            raw2 = m.up[0].head(m.up[0].trunk(d1)).clamp(-RAW_CLAMP, RAW_CLAMP)
            loc2, log_scale2 = raw2.chunk(2, -1)
            mu_p, s_p = gaussian_head(m.generative[0], z2)
        var = s_hat**2 * s_p**2 / (s_hat**2 + s_p**2)
        mean = mu_p + (mu_hat - mu_p) * s_p**2 / (s_p**2 + s_hat**2)
        return trace, (mean, var.sqrt()), (loc2, log_scale2.exp())

    trace, (mean, scale), (loc2, scale2) = guide_and_hand(0)
    q1 = base_distribution(trace.nodes["z1"]["fn"])
    q2 = base_distribution(trace.nodes["z2"]["fn"])
    for got, want in ((q1.loc, mean), (q1.scale, scale), (q2.loc, loc2), (q2.scale, scale2)):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-5)
    z1 = trace.nodes["z1"]["value"].detach()
    hand_log_q1 = td.Normal(mean, scale).log_prob(z1).sum()
    torch.testing.assert_close(
        trace.nodes["z1"]["fn"].log_prob(z1).sum(), hand_log_q1, atol=1e-5, rtol=0
    )

    with torch.no_grad():
        m.generative[0].head.bias.add_(0.5)
    trace_b, (mean_b, scale_b), _ = guide_and_hand(0)
    q1_b = base_distribution(trace_b.nodes["z1"]["fn"])
    torch.testing.assert_close(q1_b.loc.detach(), mean_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(q1_b.scale.detach(), scale_b, rtol=0, atol=1e-5)
    assert float((q1_b.loc - q1.loc).detach().abs().min()) > 1e-3  # every coordinate moved
    torch.testing.assert_close(trace_b.nodes["z2"]["value"], trace.nodes["z2"]["value"])


# -- sampling draws every layer afresh ---------------------------------------------------------
@pytest.mark.parametrize("cls", PAIRS)
@pytest.mark.parametrize("lower", [[3], [4, 3]])
def test_every_sample_draws_every_layer_afresh(cls, lower):
    """The issue's bug: all samples shared one z2. Here each of n model draws has its own value
    of every layer (distinct rows of a continuous draw), in the model's trace, in ``sample`` and
    in the engine's sampler."""
    m = make(cls, lower_latent_dims=lower, layer_hidden_dims=[4])
    n = 16
    trace = poutine.trace(m.model).get_trace(binary(n))
    for site, width in zip(m.sites, m.latent_dims, strict=True):
        z = trace.nodes[site]["value"]
        assert z.shape == (n, width)
        assert len(torch.unique(z, dim=0)) == n, site
    latents = m.sample_latents(n)
    assert all(len(torch.unique(latents[s], dim=0)) == n for s in m.sites)
    top, images = m.sample(n)
    assert len(torch.unique(top, dim=0)) == n and len(torch.unique(images, dim=0)) == n
    drawn = sample_from_model(m, binary(1), n)
    assert drawn.shape == (n, *SHAPE) and len(torch.unique(drawn, dim=0)) == n


# -- a von Mises top ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", PAIRS)
def test_a_von_mises_top_is_inferred_by_its_own_family(cls):
    """q(z_top | .) is a reparameterised von Mises, the layer below reads (cos, sin) of the
    angles, and the concentration head gets a gradient through the ELBO."""
    m = make(cls, VonMisesPrior(2), lower_latent_dims=[3], layer_hidden_dims=[4])
    assert m.generative[0].in_dim == 4
    x = binary(7)
    trace = poutine.trace(m.guide).get_trace(x)
    assert isinstance(base_distribution(trace.nodes["z2"]["fn"]), ReparameterizedVonMises)
    loss = Trace_ELBO().differentiable_loss(m.model, m.guide, x)
    top_head = m.inference[0].head if cls is HierarchicalVAE else m.up[0].head
    (grad,) = torch.autograd.grad(loss, [top_head.weight])
    assert math.isfinite(float(loss.detach())) and bool(
        grad[2:].abs().sum() > 0
    )  # concentration rows


class OnePseudoInputPrior(Prior):
    """p(z) = q(z | u) at one fixed pseudo-input u: a prior built from the model's encoder
    through ``attach`` (the VampPrior's contract, with K = 1 and u not learned)."""

    def attach(self, *, encoder: torch.nn.Module, data_shape: tuple[int, ...]) -> None:
        self.__dict__["_encoder"] = encoder
        self.register_buffer(
            "u", torch.linspace(0, 1, math.prod(data_shape)).reshape(1, *data_shape)
        )

    def forward(self) -> dist.Distribution:
        encoder = self.__dict__.get("_encoder")
        if encoder is None:
            raise ConfigError("OnePseudoInputPrior needs attach(encoder=..., data_shape=...)")
        return dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(1)), encoder(self.u))

    def guide_family(self) -> MirrorFamily:
        return MirrorFamily(dist.Normal)


@pytest.mark.parametrize("cls, lower", [(HierarchicalVAE, []), (LadderVAE, []), (LadderVAE, [3])])
def test_a_prior_built_from_the_encoder_gets_q_of_the_top_layer(cls, lower):
    """The prior is handed the network of q(z_L | x): its density is q(z_L | u) computed by the
    pair's own inference path, and it trains (finite ELBO with a gradient to the encoder)."""
    m = make(cls, OnePseudoInputPrior(2), lower_latent_dims=lower, layer_hidden_dims=[4])
    z = torch.randn(5, 2)
    if cls is HierarchicalVAE:
        want = m.encoder(m.prior.u).log_prob(z)
    else:
        top = m.inference.estimates(m.prior.u)[-1]
        want = td.Normal(top["loc"], top["scale"]).log_prob(z).sum(-1)
    torch.testing.assert_close(m.prior().log_prob(z), want, rtol=1e-6, atol=1e-6)
    loss = Trace_ELBO().differentiable_loss(m.model, m.guide, binary(4))
    (grad,) = torch.autograd.grad(loss, [m.encoder.head.weight])
    assert math.isfinite(float(loss.detach())) and bool(grad.abs().sum() > 0)


def test_bottom_up_inference_refuses_a_prior_that_needs_a_top_encoder():
    with pytest.raises(ConfigError, match="--model ladder") as err:
        make(HierarchicalVAE, OnePseudoInputPrior(2), lower_latent_dims=[3])
    assert "\n" not in str(err.value)


# -- through the engine ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, prior, norm",
    [
        (HierarchicalVAE, "gaussian", "none"),
        ("ladder", "gaussian", "none"),
        ("hierarchical", "von-mises", "none"),
        ("ladder", "gaussian", "batch"),
    ],
)
def test_the_engine_trains_it_with_a_kl_per_layer(model, prior, norm):
    """fit builds the pair from its name or class with the run's prior, latent_dim and
    hidden_dims, records a KL per layer (their sum is ``kl``) and scores log p(x) over both."""
    result = fit(
        model=model,
        model_args={
            "lower_latent_dims": [4],
            "layer_hidden_dims": [8],
            "activation": "tanh",
            "norm": norm,
        },
        prior=prior,
        latent_dim=2,
        hidden_dims=[16],
        epochs=2,
        max_train=256,
        quiet=True,
        log_likelihood_samples=10,
        figures=False,
    )
    m = result.metrics
    assert m["latent_sites"] == ["z1", "z2"]
    assert result.model.num_layers == 2 and result.model.prior.latent_dim == 2
    assert result.model.norm == norm
    assert isinstance(result.model.prior, VonMisesPrior if prior == "von-mises" else GaussianPrior)
    for row in result.history:
        kl = [row["kl_z1"], row["kl_z2"]]
        assert all(math.isfinite(v) and v >= 0 for v in kl)
        assert row["kl"] == pytest.approx(sum(kl))
    assert math.isfinite(m["test_log_likelihood"]) and m["test_log_likelihood"] > m["test_elbo"]
    assert -64 * math.log(2) - 5 < m["test_elbo"] < 0  # Bernoulli 8x8 digits, barely trained


# -- bad options -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, names",
    [
        ({"lower_latent_dims": [-1]}, "lower_latent_dims"),
        ({"lower_latent_dims": [3, 0]}, "lower_latent_dims"),
        ({"lower_latent_dims": "3"}, "lower_latent_dims"),
        ({"layer_hidden_dims": [2.5]}, "layer_hidden_dims"),
        ({"hidden_dims": [-4]}, "hidden_dims"),
        ({"activation": "sigmoidal"}, "activation"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": float("nan")}, "min_scale"),
        ({"norm": "group"}, "norm"),
        ({"norm": None}, "norm"),
        ({"prior": "gaussian"}, "Prior"),
        ({"likelihood": BernoulliLikelihood((7,))}, "data shape"),
    ],
)
@pytest.mark.parametrize("cls", PAIRS)
def test_bad_options_are_one_line_errors(cls, options, names):
    args = {"prior": GaussianPrior(2), "likelihood": BernoulliLikelihood(SHAPE), **options}
    with pytest.raises(ConfigError, match=names) as err:
        cls(SHAPE, **args)
    assert "\n" not in str(err.value)


def test_bad_model_args_through_fit_are_config_errors():
    with pytest.raises(ConfigError, match="lower_latent_dims"):
        fit(model="hierarchical", model_args={"lower_latent_dims": [-2]}, epochs=1, quiet=True)
