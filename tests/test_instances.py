"""Component instances given to ``fit()``: any Pyro parameter mode, options recorded exactly."""

from __future__ import annotations

import pyro
import pytest
import torch

from ppl_vae import ConfigError, FitConfig, fit, load_run
from ppl_vae.models.priors.base import Prior
from ppl_vae.models.priors.spike_and_slab import SpikeAndSlabPrior
from ppl_vae.models.priors.von_mises import VonMisesPrior

FAST = dict(epochs=1, max_train=128, log_likelihood_samples=4, quiet=True, figures=False)


def test_a_prior_built_outside_module_local_params_trains_and_reopens(tmp_path):
    # The suite's fixture enters module_local_params=True; a user's script does not.
    with pyro.settings.context(module_local_params=False):
        prior = VonMisesPrior(6, concentration=2.5)
    result = fit(prior=prior, out=tmp_path / "run", **FAST)
    cfg = FitConfig.load(tmp_path / "run" / "config.toml")
    assert (cfg.prior, cfg.latent_dim, cfg.prior_args) == ("von-mises", 6, {"concentration": 2.5})
    run = load_run(tmp_path / "run", device="cpu")
    assert isinstance(run.vae.prior, VonMisesPrior)
    assert torch.equal(run.vae.prior.concentration, result.vae.prior.concentration.cpu())
    for k, v in result.vae.state_dict().items():
        assert torch.equal(run.vae.state_dict()[k], v.cpu()), k


def test_instance_options_other_than_defaults_round_trip(tmp_path):
    prior = SpikeAndSlabPrior(5, alpha=0.3, final_temperature=0.2)
    fit(prior=prior, out=tmp_path / "run", **FAST)
    cfg = FitConfig.load(tmp_path / "run" / "config.toml")
    assert cfg.prior_args == {"alpha": 0.3, "final_temperature": 0.2}
    assert cfg.latent_dim == 5
    assert load_run(tmp_path / "run", device="cpu").vae.prior.alpha == pytest.approx(0.3)


class TensorOptionPrior(Prior):
    def __init__(self, latent_dim: int, scale: torch.Tensor | None = None) -> None:
        super().__init__(latent_dim)
        self.register_buffer("scale", torch.ones(latent_dim) if scale is None else scale)

    def forward(self):
        return pyro.distributions.Normal(torch.zeros_like(self.scale), self.scale).to_event(1)


def test_an_option_config_toml_cannot_hold_is_a_one_line_error_before_training(tmp_path):
    prior = TensorOptionPrior(3, scale=torch.full((3,), 2.0))
    with pytest.raises(ConfigError, match=r"option `scale` of the prior instance .* is a Tensor"):
        fit(prior=prior, out=tmp_path / "run", **FAST)
    assert not (tmp_path / "run").exists()
    # In memory nothing needs reopening: it trains.
    assert fit(prior=prior, **FAST).vae.prior is prior
