"""Control of the split: ``data_seed`` fixes the data split (and M2's labelled subset)
independently of ``seed``, and ``ssl`` takes a fixed test file as ``fit`` does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppl_vae import ConfigError, FitConfig, fit, fit_ssl
from ppl_vae.cli import main

VAE = dict(epochs=1, max_train=200, hidden_dims=[16], latent_dim=2, log_likelihood_samples=2,
           quiet=True, figures=False)  # fmt: skip
M2 = dict(labels=20, max_train=200, epochs=1, latent_dim=2, hidden_dims=[16], elbo_samples=1,
          quiet=True, device="cpu", figures=False)  # fmt: skip


def test_data_seed_fixes_the_split_while_seed_moves_the_training():
    a = fit(seed=1, data_seed=7, **VAE)
    b = fit(seed=2, data_seed=7, **VAE)
    c = fit(seed=1, **VAE)  # data_seed defaults to seed: another split
    for split in ("train_x", "val_x", "test_x"):
        assert torch.equal(getattr(a.dataset, split), getattr(b.dataset, split)), split
    assert not torch.equal(a.dataset.test_x, c.dataset.test_x)
    assert a.history[0]["train_loss"] != b.history[0]["train_loss"]  # other initial weights
    # with data_seed = seed the run is the one without it: nothing changes for existing runs
    d = fit(seed=1, data_seed=1, **VAE)
    assert d.history[0]["train_loss"] == c.history[0]["train_loss"]


def test_m2_labelled_subset_follows_data_seed():
    a = fit_ssl(seed=1, data_seed=3, **M2)
    b = fit_ssl(seed=2, data_seed=3, **M2)
    c = fit_ssl(seed=2, **M2)
    assert np.array_equal(a.labelled, b.labelled)
    assert not np.array_equal(b.labelled, c.labelled)
    assert torch.equal(a.dataset.test_x, b.dataset.test_x)


def test_ssl_takes_a_fixed_test_file(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    train, path = tmp_path / "train.npz", tmp_path / "test.npz"  # a user's own fixed split
    np.savez(train, x=x[150:], y=y[150:])
    np.savez(path, x=x[:150], y=y[:150])
    y = y[:150]
    r = fit_ssl(data=str(train), test_data=str(path), **M2)
    assert len(r.dataset.test_x) == 150
    assert np.array_equal(np.asarray(r.dataset.test_y), y)
    confusion = np.asarray(r.metrics["confusion_matrix"])
    assert confusion.sum() == 150
    out = tmp_path / "run"
    argv = ["ssl", "--data", str(train), "--labels", "20", "--max-train", "200", "--epochs", "1", "--latent-dim", "2",
            "--hidden-dims", "16", "--elbo-samples", "1", "--test-data", str(path),
            "--data-seed", "4", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    from ppl_vae.config import load_run_config

    cfg = load_run_config(out / "config.toml")
    assert (cfg.test_data, cfg.data_seed) == (str(path), 4)


def test_a_bad_data_seed_is_refused():
    with pytest.raises(ConfigError, match="data_seed"):
        FitConfig(data_seed=-1)
