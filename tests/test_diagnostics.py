"""Latent diagnostics: KL per dimension, active units and the collapse warning."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae import fit
from ppl_vae.training.diagnostics import LatentCollapseWarning, latent_terms


class KnownPair:
    """q(z|x) = N([x_0, 2 x_1, 0.3, -0.2], 0.5^2) against p(z) = N(0, I): dimensions 2 and 3 of
    the posterior mean do not depend on x (dead units); the KL has a closed form per dimension."""

    scale = 0.5

    def loc(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return torch.stack(
            [x[:, 0], 2 * x[:, 1], x.new_full((n,), 0.3), x.new_full((n,), -0.2)], -1
        )

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(x.new_zeros(4), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[:, :2], 1.0).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(self.loc(x), self.scale).to_event(1))


def test_kl_per_dimension_and_active_units_against_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(500, 2, dtype=torch.float64)
    pair = KnownPair()
    terms = latent_terms(pair.model, pair.guide, x)
    site = terms["sites"]["z"]
    assert site["analytic"]
    # KL(N(m, s) || N(0, 1)) = -log s + (s^2 + m^2) / 2 - 1/2, averaged over the points
    m = pair.loc(x)
    s = pair.scale
    by_hand = (-math.log(s) + (s**2 + m**2) / 2 - 0.5).mean(0)
    assert torch.allclose(site["kl_per_dim"], by_hand, rtol=1e-12, atol=1e-12)
    # Cov_x of the posterior means: var(x_0) ~ 1, var(2 x_1) ~ 4, the constants exactly 0
    assert (site["mean_var"] > 0.01).tolist() == [True, True, False, False]
    assert site["mean_var"][2:].abs().max() < 1e-20


class NoisyPosteriors:
    """Two sites whose E_q[z | x] one guide trace gets wrong, with known answers.

    ``z1``: q(z1|x) = N(0.01 x, 1) through an identity flow, a distribution with no closed-form
    ``mean``, so each trace gives a draw. ``z2``: q(z2|z1) = N(z1, 0.5^2), whose mean given one
    trace is that trace's z1. Both have E_q[z | x] = 0.01 x, so Cov_x = 1e-4 (dead units); a
    single trace gives ~1 (active).
    """

    def model(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(z1, 0.5).to_event(1))
            pyro.sample("x", dist.Normal(x.new_zeros(1), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            base = dist.Normal(0.01 * x[:, :1], 1.0)
            flow = dist.TransformedDistribution(base, [dist.transforms.AffineTransform(0.0, 1.0)])
            z1 = pyro.sample("z1", flow.to_event(1))
            pyro.sample("z2", dist.Normal(z1, 0.5).to_event(1))


def test_posterior_means_average_over_the_guides_other_draws():
    torch.manual_seed(0)
    x = torch.randn(4000, 1)
    pair = NoisyPosteriors()
    terms = latent_terms(pair.model, pair.guide, x)
    for name in ("z1", "z2"):
        var = float(terms["sites"][name]["mean_var"][0])
        # Cov_x = 1e-4; the estimator's sd is about sqrt(2 / 4000) / 8 * sqrt(2) = 0.004 here
        # (a single trace, as before, gives ~1: an active unit)
        assert abs(var - 1e-4) < 0.012 and var < 0.01, (name, var)


def test_kl_without_a_closed_form_is_a_monte_carlo_estimate_of_it():
    """A Student-t guide against a Normal prior: no registered KL, so the one-sample estimate
    log q - log p over 20,000 points; it must lie within 5 standard errors of a 10^6-draw
    reference."""

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(0.0, 1.0).expand([1]).to_event(1), obs=x)

    q = dist.StudentT(4.0, 0.5, 0.8)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", q.expand([x.shape[0], 1]).to_event(1))

    pyro.set_rng_seed(0)
    terms = latent_terms(model, guide, torch.zeros(20_000, 1))
    site = terms["sites"]["z"]
    assert not site["analytic"]
    z = q.sample((1_000_000,))
    ref = q.log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)
    se = float(ref.std()) / math.sqrt(20_000)
    assert abs(float(site["kl_per_dim"][0]) - float(ref.mean())) < 5 * se


def test_history_holds_the_terms_and_they_add_up():
    result = fit(epochs=2, max_train=256, latent_dim=4, log_likelihood_samples=2, quiet=True,
                 figures=False)  # fmt: skip
    row = result.history[-1]
    per_dim = [row[f"kl_z_{d}"] for d in range(4)]
    assert row["kl_z"] == pytest.approx(sum(per_dim), rel=1e-9)
    assert row["kl"] == pytest.approx(row["kl_z"], rel=1e-12)
    assert 0 <= row["active_z"] <= 4 and row["active_z"] == int(row["active_z"])
    # the ELBO is recon - KL: the validation ELBO of the same epoch agrees within noise
    # (different draws and points: a few nats per point at most on 8x8 digits)
    assert abs((row["recon"] - row["kl"]) - row["val_elbo"]) < 3.0


def test_collapse_warns_once_naming_the_dimensions():
    """beta = 200 pushes q(z|x) onto the prior within a few epochs: every unit is inactive."""
    with pytest.warns(LatentCollapseWarning, match=r"units inactive \(dimensions 0, 1, 2"):
        fit(epochs=4, max_train=256, latent_dim=3, beta=200.0, log_likelihood_samples=2,
            quiet=True, figures=False)  # fmt: skip


def test_metrics_say_how_each_kl_was_computed(tmp_path):
    import json

    fit(epochs=1, max_train=128, latent_dim=3, log_likelihood_samples=2, quiet=True,
        figures=False, out=tmp_path / "run")  # fmt: skip
    latent = json.loads((tmp_path / "run" / "metrics.json").read_text())["latent"]
    assert latent["z"]["kl_method"] == "analytic" and 0 <= latent["z"]["active_units"] <= 3


def test_metrics_report_the_latent_terms_of_the_evaluated_epoch():
    """The test metrics are the best validation epoch's (best.pt): so are metrics['latent']."""
    r = fit(epochs=40, patience=2, max_train=300, hidden_dims=[32], latent_dim=4, lr=0.05,
            log_likelihood_samples=2, quiet=True, figures=False)  # fmt: skip
    best = r.metrics["best_epoch"]
    assert best < len(r.history)  # patience: two epochs past the best
    row = r.history[best - 1]
    latent = r.metrics["latent"]["z"]
    assert latent["epoch"] == best
    assert (latent["kl"], latent["active_units"]) == (row["kl_z"], int(row["active_z"]))
