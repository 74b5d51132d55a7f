"""Training: it learns, it is reproducible, resume equals uninterrupted, faults keep the run."""

from __future__ import annotations

import json
import math
import textwrap

import pytest
import torch

from ppl_vae import ConfigError, FitConfig, TrainingError, fit
from ppl_vae.training.checkpoint import load_checkpoint

TINY = dict(hidden_dims=[32], latent_dim=4, log_likelihood_samples=20, quiet=True)


def _params_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_improves_the_test_elbo():
    before = fit(epochs=1, lr=1e-12, **TINY)  # one epoch at a negligible step size: untrained
    after = fit(epochs=6, **TINY)
    untrained = before.metrics["test_elbo"]
    assert after.metrics["test_elbo"] > untrained + 5.0  # nats per point; measured gap ~12
    vals = [h["val_elbo"] for h in after.history]
    assert vals[-1] > vals[0]
    # log p(x) learns too, and the reported numbers summarise the per-point scores: the mean
    # and sd / sqrt(N) (float32 sums: 1e-5 relative)
    m, ll = after.metrics, after.test_scores.log_likelihood.double()
    assert m["test_log_likelihood"] > before.metrics["test_log_likelihood"] + 5.0
    assert m["test_log_likelihood"] == pytest.approx(float(ll.mean()), rel=1e-5)
    assert m["test_log_likelihood_se"] == pytest.approx(
        float(ll.std() / math.sqrt(len(ll))), rel=1e-4
    )
    assert m["test_log_likelihood"] >= m["test_elbo"]  # Jensen, next to the checks above


def test_same_seed_same_history_and_different_seed_differs():
    a = fit(epochs=2, seed=3, **TINY)
    b = fit(epochs=2, seed=3, **TINY)
    c = fit(epochs=2, seed=4, **TINY)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert _params_equal(a.vae, b.vae)
    assert a.metrics["test_log_likelihood"] == b.metrics["test_log_likelihood"]
    assert strip(a.history) != strip(c.history)


def test_resume_equals_uninterrupted(tmp_path):
    full = fit(epochs=4, out=tmp_path / "full", figures=False, **TINY)
    fit(epochs=2, out=tmp_path / "part", figures=False, **TINY)
    resumed = fit(out=tmp_path / "part", resume=True, epochs=4, quiet=True, figures=False)
    assert _params_equal(full.vae, resumed.vae)
    assert [h["val_elbo"] for h in full.history] == [h["val_elbo"] for h in resumed.history]
    assert full.metrics["test_log_likelihood"] == resumed.metrics["test_log_likelihood"]
    assert FitConfig.load(tmp_path / "part" / "config.toml").epochs == 4


def test_run_directory_contents(tmp_path):
    r = fit(epochs=2, out=tmp_path / "run", **TINY)
    run = tmp_path / "run"
    for name in ("config.toml", "metrics.json", "history.csv", "scores.csv", "checkpoint.pt"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in (
        "test_elbo",
        "test_log_likelihood",
        "log_likelihood_samples",
        "epochs",
        "train_seconds",
        "prior",
        "likelihood",
        "estimator",
    ):
        assert key in metrics, key
    assert metrics["prior"] == "gaussian" and metrics["estimator"] == "trace"
    # Bernoulli on binarised digits is a mass function: bits/dim = -log p(x) / (64 ln 2).
    assert metrics["test_bits_per_dim"] == pytest.approx(
        -metrics["test_log_likelihood"] / (64 * math.log(2)), rel=1e-9
    )
    for fig in (
        "elbo.png",
        "reconstructions.png",
        "samples.png",
        "latent.png",
        "interpolation.png",
    ):
        assert (run / "figures" / fig).stat().st_size > 1000, fig
    assert len((run / "history.csv").read_text().splitlines()) == 3
    scores = (run / "scores.csv").read_text().splitlines()
    assert scores[0] == "index,label,elbo,log_likelihood"
    assert len(scores) == 1 + r.dataset.test_x.shape[0]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state) >= {"model", "optimizer", "rng", "config", "history"}


def test_existing_run_is_never_overwritten_without_a_flag(tmp_path):
    fit(epochs=1, out=tmp_path / "run", figures=False, **TINY)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"already exists; pass --resume .* or --overwrite"):
        fit(epochs=1, out=tmp_path / "run", **TINY)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert before == after
    fit(epochs=1, out=tmp_path / "run", overwrite=True, figures=False, seed=1, **TINY)


def test_resume_without_a_run_and_with_other_options(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume"):
        fit(out=tmp_path / "none", resume=True)
    fit(epochs=1, out=tmp_path / "run", figures=False, **TINY)
    with pytest.raises(ConfigError, match="only `epochs` and `device` may change"):
        fit(out=tmp_path / "run", resume=True, lr=0.1)


NAN_LIKELIHOOD = textwrap.dedent(
    '''
    import pyro.distributions as dist
    import torch
    from ppl_vae.models.likelihoods.base import Likelihood

    class FlakyLikelihood(Likelihood):
        """A Normal likelihood that returns NaN once a class-level call counter passes 13 (the
        first step calls it twice: Pyro's validated step, then the fast path's value)."""
        calls = 0

        def forward(self, out):
            (loc,) = self.split(out)
            if self.training:
                type(self).calls += 1
            if type(self).calls > 13:
                loc = loc * float("nan")
            return dist.Normal(loc, torch.ones_like(loc)).to_event(self.event_dim)
    '''
)


def test_non_finite_loss_names_epoch_and_batch_and_keeps_the_checkpoint(tmp_path):
    path = tmp_path / "flaky.py"
    path.write_text(NAN_LIKELIHOOD)
    # digits: 1294 training points at batch 128 = 11 steps per epoch; step 13 is epoch 2, batch 2.
    with pytest.raises(TrainingError, match=r"non-finite .* at epoch 2, batch 2 of 11; the last"):
        fit(epochs=3, likelihood=f"{path}:FlakyLikelihood", out=tmp_path / "run", **TINY)
    state = load_checkpoint(tmp_path / "run")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_corrupted_checkpoint_falls_back_then_fails_clearly(tmp_path):
    run = tmp_path / "run"
    fit(epochs=2, out=run, figures=False, **TINY)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.warns(
        RuntimeWarning, match="truncated or corrupted.*using the previous checkpoint"
    ):
        assert load_checkpoint(run)["epoch"] == 1
    (run / "checkpoint.prev.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="truncated or corrupted"):
        load_checkpoint(run)


def test_kl_warmup_is_linear_in_steps():
    r = fit(epochs=3, warmup_epochs=2, beta=0.5, **TINY)
    assert [h["kl_scale"] for h in r.history] == [0.25, 0.5, 0.5]


def test_bernoulli_gets_dynamic_binarisation_and_strict_checks():
    r = fit(epochs=1, **TINY)
    assert r.metrics["binarization"] == "dynamic"
    with pytest.raises(ConfigError, match=r"continuous-bernoulli.*--binarize"):
        fit(epochs=1, binarize="none", **TINY)
    r = fit(epochs=1, binarize="static", **TINY)
    assert r.metrics["binarization"] == "static"


def test_bad_data_is_rejected_before_training(tmp_path):
    import numpy as np

    x = np.random.default_rng(0).random((50, 64)).astype(np.float32)
    x[3, 5] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ConfigError, match="NaN"):
        fit(data=str(tmp_path / "nan.npy"), likelihood="normal", epochs=1, **TINY)
    with pytest.raises(ConfigError, match="Unknown estimator 'trcae'"):
        fit(estimator="trcae", epochs=1, **TINY)
    with pytest.raises(ConfigError, match="Unknown prior"):
        fit(prior="gausian", epochs=1, **TINY)
