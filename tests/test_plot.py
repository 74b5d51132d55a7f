"""Latent figures (``ppl-vae plot`` and every run's figures): traversals, posterior histograms,
KL per dimension.

Independent computations: the traversal grid from ``scipy.stats.norm.ppf`` (Gaussian prior),
from the circle's angles (von Mises) and from the spike-and-slab mixture's quantiles written
out by hand; the decoded rows from ``decode_mean`` of codes built by hand from the encoder's
own location; for the hierarchical pair, the held codes and p(z1 | z2) from its networks; the
KL per dimension in closed form from the encoder's parameters (Gaussian, von Mises) and from
``history.csv`` read as text; inactive marking on both sides of 0.01 nats.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from scipy.special import i0e, i1e
from scipy.stats import norm

from ppl_vae import fit
from ppl_vae.cli import main
from ppl_vae.latent_figures import (
    INACTIVE_KL,
    TRAVERSAL_QUANTILES,
    inactive_dims,
    kl_order,
    m2_view,
    pair_view,
    plot_run,
    row_titles,
    traversal_codes,
    traversal_values,
    traverse,
    vae_view,
    write_latent_figures,
)
from ppl_vae.models.priors import Prior
from ppl_vae.models.priors.spike_and_slab import SpikeAndSlabPrior
from ppl_vae.runs.reopen import load_run
from ppl_vae.training.setup import prepare_data

PNG = b"\x89PNG\r\n\x1a\n"
TINY = dict(epochs=2, max_train=300, hidden_dims=[32], latent_dim=4, log_likelihood_samples=5,
            quiet=True)  # fmt: skip
RUNS = {
    "gaussian": dict(TINY, figures=True),
    "von-mises": dict(TINY, prior="von-mises", figures=False),
    "hierarchical": dict(
        TINY, model="hierarchical", model_args={"lower_latent_dims": [4]}, figures=True
    ),
}
ONE_SITE = {"traversals_z.png", "posterior_z.png", "kl_per_dimension.png"}
TWO_LAYERS = {f"{f}_{s}.png" for f in ("traversals", "posterior") for s in ("z1", "z2")}
PNGS = {
    "gaussian": ONE_SITE,
    "von-mises": ONE_SITE,
    "hierarchical": TWO_LAYERS | {"kl_per_dimension.png"},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    return {name: fit(out=root / name, **options).run_dir for name, options in RUNS.items()}


def _test_x(run):
    return prepare_data(run.dataset, run.model, run.config.binarize, run.config.seed)[2]


def _last_history_row(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))[-1]


# -- the command --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_plot_writes_the_figures(runs, name, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["plot", str(runs[name]), "--out", str(out)]) == 0
    written = {p.name for p in out.iterdir()}
    assert written == PNGS[name]
    assert all((out / f).read_bytes()[:8] == PNG for f in written)
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(out / f) for f in written)


def test_plot_which_and_bad_input(runs, tmp_path, capsys):
    out = tmp_path / "kl"
    assert main(["plot", str(runs["gaussian"]), "--out", str(out), "--which", "kl"]) == 0
    assert {p.name for p in out.iterdir()} == {"kl_per_dimension.png"}
    assert main(["plot", str(runs["gaussian"]), "--which", "kl,hist"]) == 2
    assert (
        "--which takes some of traversals,histograms,kl, got 'kl,hist'" in capsys.readouterr().err
    )
    assert main(["plot", str(runs["gaussian"]), "--test-point", "100000"]) == 2
    assert "test point must be in [0, " in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_every_run_writes_them(runs):
    """The kinds' own figures (fit with figures) include the latent ones."""
    for name in ("gaussian", "hierarchical"):
        written = {p.name for p in (runs[name] / "figures").iterdir()}
        assert PNGS[name] <= written
        assert "elbo.png" in written


# -- the traversal grid ---------------------------------------------------------------------------
def test_gaussian_traversal_is_decoded_prior_quantiles(runs):
    run = load_run(runs["gaussian"])
    vae, x = run.vae, _test_x(run)
    point = 3
    with torch.no_grad():
        t = traverse("z", vae_view(vae, x, run.dataset.image_shape, point).traversable["z"])
        ppf = norm.ppf(TRAVERSAL_QUANTILES)
        z0 = vae.encode(x[point : point + 1]).base_dist.loc[0]  # the encoder's own location
        assert t.values.shape == (9, 4)
        np.testing.assert_allclose(t.values.numpy(), np.repeat(ppf[:, None], 4, 1), atol=1e-6)
        for d in range(4):
            by_hand = z0.repeat(9, 1)
            by_hand[:, d] = torch.as_tensor(ppf, dtype=by_hand.dtype)
            torch.testing.assert_close(t.codes[d], by_hand, atol=1e-6, rtol=0)
            torch.testing.assert_close(t.images[d], vae.decode_mean(by_hand), atol=1e-6, rtol=0)


def test_von_mises_traversal_goes_round_the_circle(runs):
    run = load_run(runs["von-mises"])
    vae, x = run.vae, _test_x(run)
    with torch.no_grad():
        t = traverse("z", vae_view(vae, x, None, 0).traversable["z"])
        angles = -math.pi + 2 * math.pi * np.arange(9) / 9  # the prior's location is 0
        assert t.grid == "circular"
        np.testing.assert_allclose(t.values.numpy(), np.repeat(angles[:, None], 4, 1), atol=1e-6)
        pi = torch.tensor(math.pi, dtype=t.values.dtype)
        assert bool((t.values >= -pi).all() & (t.values < pi).all())  # [-pi, pi): no duplicate
        z0 = vae.encode(x[:1]).base_dist.loc[0]
        for d in range(4):
            by_hand = z0.repeat(9, 1)
            by_hand[:, d] = torch.as_tensor(angles, dtype=by_hand.dtype)
            torch.testing.assert_close(t.images[d], vae.decode_mean(by_hand), atol=1e-6, rtol=0)


def test_spike_and_slab_quantiles_hold_exact_zeros():
    """(1 - a) delta_0 + a N(0, 1), a = 0.4: the slab's mass below 0 is 0.2, the spike holds
    the quantiles in [0.2, 0.8]."""
    prior = SpikeAndSlabPrior(3, alpha=0.4)
    q = [0.05, 0.19, 0.2, 0.5, 0.8, 0.81, 0.95]
    values = traversal_values(prior, q)
    by_hand = [norm.ppf(0.05 / 0.4), norm.ppf(0.19 / 0.4), 0, 0, 0,
               norm.ppf((0.81 - 0.6) / 0.4), norm.ppf((0.95 - 0.6) / 0.4)]  # fmt: skip
    np.testing.assert_allclose(values.numpy(), np.repeat(np.array(by_hand)[:, None], 3, 1),
                               atol=1e-6)  # fmt: skip
    assert bool((values[2:5] == 0).all())  # exact zeros, not small numbers
    # and they are the quantiles of the prior's own draws (200k: quantile se < 0.01)
    draws = prior().sample((200_000,)).numpy()
    np.testing.assert_allclose(
        values.numpy()[[0, 3, 6]], np.quantile(draws, [0.05, 0.5, 0.95], axis=0), atol=0.03
    )
    codes = traversal_codes(prior, torch.tensor([0.1, 0.2, 0.3]), q)
    assert codes.shape == (3, 7, 3)
    assert bool((codes[1, :, 0] == 0.1).all()) and bool((codes[1, :, 1] == values[:, 1]).all())


class ThreePointPrior(Prior):
    """A user's prior in one small file: a standard Gaussian whose traversals sweep -1, 0, 1
    (spread over the columns), whatever the quantiles."""

    traversal_grid = "three points"
    traversal_description = "-1, 0 and 1"

    def forward(self) -> dist.Distribution:
        return dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1)

    def traversal_values(self, quantiles: torch.Tensor) -> torch.Tensor:
        steps = torch.tensor([-1.0, 0.0, 1.0])[torch.arange(len(quantiles)) % 3]
        return steps[:, None].expand(-1, self.latent_dim)


class GridNormal(dist.Normal):
    """A distribution-level hook (what a user's pair samples from): values 10 * q."""

    def traversal_values(self, quantiles: torch.Tensor) -> torch.Tensor:
        return 10 * quantiles.to(self.loc)[:, None].expand(-1, *self.batch_shape)


def test_a_user_prior_chooses_its_traversal_values(tmp_path):
    """The prior's hook replaces the Gaussian quantiles (norm.ppf) the same prior gets without
    it, in the values, the codes decoded and the figure; a distribution's hook does the same."""
    from ppl_vae import build_vae

    q = list(TRAVERSAL_QUANTILES)
    x = torch.bernoulli(torch.full((12, 16), 0.5))
    want = torch.tensor([-1.0, 0.0, 1.0] * 3)[:, None].expand(9, 3)
    with torch.no_grad():
        vae = build_vae((16,), prior=ThreePointPrior(3), hidden_dims=(8,)).eval()
        view = vae_view(vae, x, None, point=1)
        t = traverse("z", view.traversable["z"])
        torch.testing.assert_close(t.values, want)
        assert t.grid == "three points" and t.description == "-1, 0 and 1" and not t.circular
        by_hand = vae.posterior_mean(x[1:2])[0].repeat(9, 1)
        by_hand[:, 2] = want[:, 2]
        torch.testing.assert_close(t.codes[2], by_hand)
        torch.testing.assert_close(t.images[2], vae.decode_mean(by_hand))
        # without the hook: the Gaussian's quantiles
        plain = traversal_values(dist.Normal(torch.zeros(3), 1.0).to_event(1), q)
        np.testing.assert_allclose(plain.numpy()[:, 0], norm.ppf(q), atol=1e-6)
        # on the distribution, under to_event
        p = GridNormal(torch.zeros(3), torch.ones(3)).to_event(1)
        torch.testing.assert_close(
            traversal_values(p, q), 10 * torch.tensor(q)[:, None].expand(9, 3)
        )
        out = write_latent_figures(tmp_path, view, which=["traversals"])
    assert [f.name for f in out.paths] == ["traversals_z.png"]


def test_pair_traversal_follows_the_hierarchy(runs):
    """Sweeping z1: z2 held at its mean, p(z1 | z2) quantiles. Sweeping z2: z1 at the mean of
    p(z1 | z2) for each code. The held means from the pair's own networks."""
    run = load_run(runs["hierarchical"])
    pair, x = run.model, _test_x(run)
    with torch.no_grad():
        view = pair_view(pair, x, None, 2)
        z1_mean = pair.encoder(x[2:3]).mean
        z2_mean = pair.inference[0](z1_mean).mean
        torch.testing.assert_close(view.traversable["z1"].z0, z1_mean[0])
        torch.testing.assert_close(view.traversable["z2"].z0, z2_mean[0])
        t1 = traverse("z1", view.traversable["z1"])
        p1 = pair.conditional(1, z2_mean).base_dist
        by_hand = p1.loc + p1.scale * torch.as_tensor(norm.ppf(TRAVERSAL_QUANTILES))[:, None]
        torch.testing.assert_close(t1.values, by_hand.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t1.images[1], pair.decode_mean(t1.codes[1]))
        t2 = traverse("z2", view.traversable["z2"])
        z1_given = pair.conditional(1, t2.codes[3]).mean
        torch.testing.assert_close(t2.images[3], pair.decode_mean(z1_given))


def test_m2_traversal_holds_the_predicted_class():
    from ppl_vae.ssl import build_ssvae

    model = build_ssvae((16,), 3, latent_dim=2, hidden_dims=(8,)).eval()
    x = torch.bernoulli(torch.full((12, 16), 0.5))
    with torch.no_grad():
        pred = model.predict(x)
        view = m2_view(model, x, pred, None, point=5)
        t = traverse("z", view.traversable["z"])
        y = torch.nn.functional.one_hot(pred[5:6], 3).float().expand(9, 3)
        assert int(pred[5]) in range(3)
        z0 = model.q_z(x[5:6], y[:1]).base_dist.loc[0]
        by_hand = z0.repeat(9, 1)
        by_hand[:, 1] = torch.as_tensor(norm.ppf(TRAVERSAL_QUANTILES), dtype=z0.dtype)
        torch.testing.assert_close(t.images[1], model.decode_mean(by_hand, y), atol=1e-6, rtol=0)
        other = torch.nn.functional.one_hot((pred[5:6] + 1) % 3, 3).float().expand(9, 3)
        assert not torch.allclose(t.images[1], model.decode_mean(by_hand, other))
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = write_latent_figures(d, view)
    assert [p.name for p in out.paths] == ["traversals_z.png", "posterior_z.png",
                                           "kl_per_dimension.png"]  # fmt: skip
    assert set(out.kl) == {"y", "z"} and out.kl["y"].per_dim is None  # y's KL: whole site


# -- KL per dimension -------------------------------------------------------------------------------
def test_kl_bars_are_the_closed_form(runs, tmp_path):
    """Gaussian: KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s, per dimension, averaged
    over the test points; the history's are the last row of history.csv."""
    run_dir = runs["gaussian"]
    out = plot_run(run_dir, out=tmp_path)
    run = load_run(run_dir)
    x = _test_x(run)[:2000]
    with torch.no_grad():
        q = run.vae.encode(x).base_dist
        m, s = q.loc.double(), q.scale.double()
    by_hand = ((m**2 + s**2 - 1) / 2 - s.log()).mean(0)
    kl = out.kl["z"]
    assert kl.analytic
    torch.testing.assert_close(kl.per_dim, by_hand, atol=1e-6, rtol=1e-6)
    row = _last_history_row(run_dir)
    history = torch.tensor([float(row[f"kl_z_{d}"]) for d in range(4)], dtype=torch.float64)
    torch.testing.assert_close(kl.history, history)
    # rows: most KL first; "inactive" exactly where the closed form is below 0.01 nats
    t = out.traversals["z"]
    assert t.rows == sorted(range(4), key=lambda d: -float(by_hand[d]))
    for d, title in zip(t.rows, t.titles):
        assert title.startswith(f"z[{d}]  KL ")
        assert ("inactive" in title) == (float(by_hand[d]) < 0.01)


def test_von_mises_kl_is_the_closed_form(runs, tmp_path):
    """KL(vM(mu, k) || vM(0, k0)) = k A(k) - log I0(k) - k0 A(k) cos(mu) + log I0(k0),
    A = I1 / I0."""
    out = plot_run(runs["von-mises"], out=tmp_path, which=["kl"])
    run = load_run(runs["von-mises"])
    x = _test_x(run)[:2000]
    with torch.no_grad():
        q = run.vae.encode(x).base_dist
    mu, k = q.loc.double().numpy(), q.concentration.double().numpy()
    k0 = float(run.vae.prior.concentration[0])
    a = i1e(k) / i0e(k)
    log_i0 = np.log(i0e(k)) + k
    by_hand = (k * a - log_i0 - k0 * a * np.cos(mu) + np.log(i0e(k0)) + k0).mean(0)
    np.testing.assert_allclose(out.kl["z"].per_dim.numpy(), by_hand, rtol=1e-5, atol=1e-6)
    assert [p.name for p in out.paths] == ["kl_per_dimension.png"]


def test_hierarchical_kl_has_one_panel_per_layer(runs, tmp_path):
    out = plot_run(runs["hierarchical"], out=tmp_path, which=["kl"])
    assert set(out.kl) == {"z1", "z2"}
    row = _last_history_row(runs["hierarchical"])
    for site in ("z1", "z2"):
        assert out.kl[site].per_dim.shape == (4,)
        want = torch.tensor([float(row[f"kl_{site}_{d}"]) for d in range(4)], dtype=torch.float64)
        torch.testing.assert_close(out.kl[site].history, want)


def test_inactive_marking_follows_the_threshold():
    kl = torch.tensor([0.5, INACTIVE_KL - 1e-6, INACTIVE_KL, 0.0])
    assert inactive_dims(kl).tolist() == [False, True, False, True]
    assert kl_order(kl) == [0, 2, 1, 3]
    assert kl_order(torch.tensor([0.2, 0.3, 0.2])) == [1, 0, 2]  # ties: lower index first
    titles = row_titles("z", kl_order(kl), kl)
    assert [t.endswith("· inactive") for t in titles] == [False, False, True, True]
    assert titles[0] == "z[0]  KL 0.5"
