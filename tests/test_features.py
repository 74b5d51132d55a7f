"""M1+M2: M2 trained on a VAE run's codes (``ssl --features RUN_DIR``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ppl_vae import ConfigError, fit, fit_ssl
from ppl_vae.cli import main
from ppl_vae.runs import load_run
from ppl_vae.runs.features import feature_dataset

from .fixtures import write_svhn_fixture

M1 = dict(epochs=2, max_train=200, hidden_dims=[16], latent_dim=3, log_likelihood_samples=2,
          quiet=True, figures=False)  # fmt: skip
M2 = dict(labels=20, epochs=1, latent_dim=2, hidden_dims=[16], elbo_samples=1, quiet=True,
          device="cpu", figures=False)  # fmt: skip


@pytest.fixture(scope="module")
def m1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m1") / "run"
    fit(out=out, **M1)
    return out


def test_mean_features_are_the_encoders_locations_on_the_runs_own_split(m1_run):
    ds = feature_dataset(m1_run, "mean")
    run = load_run(m1_run, device="cpu")
    for split in ("train", "val", "test"):
        x = getattr(run.dataset, f"{split}_x")
        with torch.no_grad():
            loc = run.vae.encoder.params(x)["loc"]  # the Normal's location, by hand
        assert torch.allclose(getattr(ds, f"{split}_x"), loc, atol=1e-6), split
        assert torch.equal(getattr(ds, f"{split}_y"), getattr(run.dataset, f"{split}_y"))
    assert ds.data_shape == (3,) and ds.image_shape is None


def test_sampled_features_are_fixed_by_the_seed_and_spread_around_the_mean(m1_run):
    a, b = feature_dataset(m1_run, "sample", seed=5), feature_dataset(m1_run, "sample", seed=5)
    c = feature_dataset(m1_run, "sample", seed=6)
    mean = feature_dataset(m1_run, "mean")
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    run = load_run(m1_run, device="cpu")
    with torch.no_grad():
        scale = run.vae.encoder.params(run.dataset.train_x)["scale"]
    z = (a.train_x - mean.train_x) / scale  # standard normal if the draws are q's
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1) < 0.1


def test_m2_trains_on_the_codes_and_reopens_them(m1_run, tmp_path):
    out = tmp_path / "m1m2"
    r = fit_ssl(features=str(m1_run), out=out, **M2)
    m = r.metrics
    assert m["data"]["data_shape"] == [3] and m["likelihood"] == "normal"
    assert len(r.dataset.test_x) == len(load_run(m1_run).dataset.test_x)
    assert np.isfinite(m["test_accuracy"]) and np.isfinite(m["test_elbo"])
    assert main(["evaluate", str(out)]) == 0
    evaluated = json.loads((out / "evaluation.json").read_text())
    assert evaluated["test_accuracy"] == pytest.approx(m["test_accuracy"])


def test_data_options_with_features_are_refused(m1_run, capsys):
    with pytest.raises(ConfigError, match=r"drop \['max_train'\]"):
        fit_ssl(features=str(m1_run), max_train=100, **M2)
    code = main(["ssl", "--features", str(m1_run), "--data", "mnist", "--labels", "20"])
    err = capsys.readouterr().err
    assert code == 2 and "are those of the run" in err and len(err.strip().splitlines()) == 1


def test_features_from_a_run_that_is_not_a_vae_are_refused(tmp_path):
    ssl_run = tmp_path / "m2"
    fit_ssl(out=ssl_run, max_train=200, **M2)
    with pytest.raises(ConfigError, match="features come from a VAE run"):
        feature_dataset(ssl_run)


@pytest.mark.slow
def test_m1_plus_m2_on_the_svhn_fixture_through_the_cli(tmp_path, capsys):
    write_svhn_fixture(tmp_path / "data", n_train=90, n_test=20)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    data = ["--data", "svhn", "--data-root", str(tmp_path / "data")]
    assert main(["fit", *data, "--epochs", "1", "--latent-dim", "4", "--hidden-dims", "16",
                 "--log-likelihood-samples", "2", "--quiet", "--out", str(m1)]) == 0  # fmt: skip
    assert main(["ssl", "--features", str(m1), "--labels", "20", "--epochs", "1",
                 "--latent-dim", "2", "--hidden-dims", "16", "--elbo-samples", "1",
                 "--quiet", "--out", str(m2)]) == 0  # fmt: skip
    m = json.loads((m2 / "metrics.json").read_text())
    assert m["data"]["data_shape"] == [4] and m["labels"] == 20 and m["data"]["sizes"]["test"] == 20
