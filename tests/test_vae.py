"""The VAE is an ordinary Pyro model/guide pair: sites, plates, shapes, scaling, state."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO

from ppl_vae import ConfigError, build_vae
from ppl_vae.guides.encoders import ConvEncoder, MLPEncoder
from ppl_vae.models.decoders import ConvDecoder, MLPDecoder

SHAPES = [((64,), "mlp"), ((1, 28, 28), "mlp"), ((1, 28, 28), "conv"), ((3, 32, 32), "conv")]


@pytest.mark.parametrize(("data_shape", "network"), SHAPES)
def test_model_and_guide_sites_and_shapes(data_shape, network, device):
    vae = build_vae(
        data_shape, likelihood="normal", latent_dim=3, hidden_dims=(16,), network=network
    )
    vae.to(device)
    x = torch.rand(5, *data_shape, device=device)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["value"].shape == (5, 3)
    assert model_tr.nodes["x"]["is_observed"]
    assert model_tr.nodes["x"]["fn"].event_shape == data_shape
    assert model_tr.nodes["x"]["fn"].batch_shape == (5,)
    for tr in (guide_tr, model_tr):
        assert [f.name for f in tr.nodes["z"]["cond_indep_stack"]] == ["data"]
        assert tr.nodes["z"]["cond_indep_stack"][0].dim == -1
    enc, dec = (MLPEncoder, MLPDecoder) if network == "mlp" else (ConvEncoder, ConvDecoder)
    assert isinstance(vae.encoder, enc) and isinstance(vae.decoder, dec)


def test_vectorized_particles_shapes():
    vae = build_vae(
        (1, 28, 28), likelihood="normal", latent_dim=2, hidden_dims=(8,), network="conv"
    )
    x = torch.rand(4, 1, 28, 28)
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x)
    assert loss.shape == () and torch.isfinite(loss)


def test_linear_maps_with_empty_hidden_dims():
    vae = build_vae((64,), likelihood="normal", latent_dim=2, hidden_dims=())
    linears = [m for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2  # encoder head and decoder, nothing else
    assert not any(isinstance(m, torch.nn.ReLU) for m in vae.modules())


def test_guide_family_mirrors_the_prior():
    vae = build_vae((64,), latent_dim=4, hidden_dims=(8,))
    q = vae.encode(torch.rand(3, 64))
    assert isinstance(q, dist.Independent) and isinstance(q.base_dist, dist.Normal)
    assert vae.encoder.head.out_features == 2 * 4  # loc and scale blocks
    assert bool((q.base_dist.scale > 0).all())


def test_state_dict_holds_every_parameter():
    vae = build_vae(
        (64,),
        likelihood="normal",
        prior_args={"learn_loc": True, "learn_scale": True},
        hidden_dims=(8,),
    )
    names = set(vae.state_dict())
    assert any(n.startswith("prior.loc") for n in names)
    assert any(n.startswith("likelihood.scale") for n in names)
    n_params = sum(p.numel() for p in vae.parameters())
    assert n_params == sum(
        v.numel()
        for k, v in vae.state_dict().items()
        if "unconstrained" in k or k.endswith(("weight", "bias"))
    )


def test_kl_scale_scales_the_z_site_in_model_and_guide():
    vae = build_vae((64,), latent_dim=2, hidden_dims=(8,))
    x = torch.rand(6, 64).round()
    vae.kl_scale = 0.25
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["scale"] == 0.25 and model_tr.nodes["z"]["scale"] == 0.25
    assert model_tr.nodes["x"]["scale"] == 1.0
    # The scaled ELBO is log p(x|z) + 0.25 (log p(z) - log q(z|x)), for the same z.
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    expected = model_tr.nodes["x"]["log_prob_sum"] + 0.25 * (
        model_tr.nodes["z"]["fn"].log_prob(model_tr.nodes["z"]["value"]).sum()
        - guide_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"]).sum()
    )
    got = model_tr.log_prob_sum() - guide_tr.log_prob_sum()
    assert torch.allclose(got, expected, rtol=1e-5)


def test_predictive_works_unchanged():
    vae = build_vae((64,), latent_dim=2, hidden_dims=(8,))
    x = torch.rand(7, 64).round()
    samples = Predictive(vae.model, guide=vae.guide, num_samples=3)(x)
    assert samples["z"].shape == (3, 7, 2)


def test_bad_data_shape_is_named():
    vae = build_vae((1, 28, 28), latent_dim=2, hidden_dims=(8,), network="conv")
    with pytest.raises(ConfigError, match=r"data has shape \(2, 3, 32, 32\).*\(N, 1, 28, 28\)"):
        vae.check_input(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ConfigError, match="encoder was built for"):
        vae.guide(torch.zeros(2, 3, 32, 32))


def test_conv_network_rejects_odd_image_sizes():
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_vae((1, 30, 30), network="conv")


def test_sample_and_decode_mean_shapes():
    vae = build_vae((1, 28, 28), latent_dim=2, hidden_dims=(8,))
    z, x = vae.sample(5)
    assert z.shape == (5, 2) and x.shape == (5, 1, 28, 28)
    assert bool(((x >= 0) & (x <= 1)).all())


def test_raw_outputs_are_clamped_so_scales_stay_finite():
    vae = build_vae((64,), latent_dim=2, hidden_dims=(8,))
    with torch.no_grad():
        vae.encoder.head.bias.fill_(1e4)
    q = vae.encode(torch.rand(3, 64))
    assert torch.isfinite(q.base_dist.scale).all()
    assert torch.isfinite(q.log_prob(q.sample())).all()


def test_vae_moves_with_one_to(device):
    vae = build_vae((64,), latent_dim=2, hidden_dims=(8,)).to(device)
    assert {p.device.type for p in vae.parameters()} == {device.type}
    assert {b.device.type for b in vae.buffers()} == {device.type}
    loss = Trace_ELBO().differentiable_loss(
        vae.model, vae.guide, torch.rand(3, 64, device=device).round()
    )
    assert loss.device.type == device.type
