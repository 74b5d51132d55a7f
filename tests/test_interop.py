"""Pyro interop as the README promises: the model kinds' programs train under plain ``SVI``.

``SVI(vae.model, vae.guide, pyro.optim.Adam(...), Trace_ELBO())`` in Pyro's default (global
parameter store) mode must find every parameter of the module, and the ones it steps must be
the module's own (not copies), so that training through SVI trains the VAE.
"""

from __future__ import annotations

import pyro
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO

from ppl_vae import build_ssvae, build_vae, fit
from ppl_vae.data import load_data
from ppl_vae.inference.scoring import mean_elbo


def _digits() -> torch.Tensor:
    ds = load_data("digits", binarize="static", seed=0)
    return ds.train_x[:512], ds.val_x


def test_plain_svi_trains_the_vae_in_the_global_param_store():
    x, val = _digits()
    with pyro.settings.context(module_local_params=False):
        pyro.clear_param_store()
        vae = build_vae((64,), latent_dim=8, hidden_dims=(64,))
        before = {n: p.detach().clone() for n, p in vae.named_parameters()}
        elbo_before = mean_elbo(vae, val)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
        for i in range(300):
            svi.step(x[(i * 64) % 512 : (i * 64) % 512 + 64])
        store = pyro.get_param_store()
        stored = {id(store._params[k]) for k in store.keys()}
        # every trainable tensor of the module is in the store, as itself (not a copy)
        assert stored == {id(p) for p in vae.parameters()}
        moved = [n for n, p in vae.named_parameters() if not torch.equal(before[n], p)]
        assert moved == list(before), f"unchanged: {sorted(set(before) - set(moved))}"
        elbo_after = mean_elbo(vae, val)
    # Untrained, the Bernoulli decoder gives about -64 log 2 = -44 nats per point; 300 steps of
    # Adam reach about -32 (a 1-sample estimate on 179 points: its noise is under 1 nat).
    assert elbo_after > elbo_before + 5, (elbo_before, elbo_after)
    pyro.clear_param_store()


def test_plain_svi_trains_the_m2_labelled_pair():
    ds = load_data("digits", binarize="static", seed=0)
    x, y = ds.train_x[:256], ds.train_y[:256]
    with pyro.settings.context(module_local_params=False):
        pyro.clear_param_store()
        model = build_ssvae((64,), 10, likelihood="bernoulli", latent_dim=4, hidden_dims=(32,))
        svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
        first = sum(svi.evaluate_loss(x, y) for _ in range(5)) / 5
        for _ in range(200):
            svi.step(x, y)
        last = sum(svi.evaluate_loss(x, y) for _ in range(5)) / 5
        names = set(pyro.get_param_store().keys())
    # the encoder, the decoder and the classifier (observed y: no label-guide site) register
    assert any(n.startswith("encoder") for n in names) and any(
        n.startswith("decoder") for n in names
    )
    # summed over 256 points: from about 256 * 46 nats to below 256 * 38
    assert last < first - 256 * 5, (first, last)
    pyro.clear_param_store()


def test_a_fitted_vae_keeps_training_under_plain_svi(tmp_path):
    """The README's third example: fit(), then a plain-Pyro SVI loop on the trained model."""
    result = fit(epochs=2, max_train=256, log_likelihood_samples=5, quiet=True, figures=False)
    vae, ds = result.vae, result.dataset
    x = ds.train_x
    with pyro.settings.context(module_local_params=False):
        pyro.clear_param_store()
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        head = vae.encoder.head.weight.detach().clone()
        for _ in range(20):
            svi.step(torch.bernoulli(x[:128]))
        assert not torch.equal(head, vae.encoder.head.weight)
    pyro.clear_param_store()
