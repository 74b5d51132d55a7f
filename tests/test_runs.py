"""Run directories know their kind: ``load_run``, ``evaluate`` and ``sample`` on an M2 run.

The M2 log-likelihood sums y out exactly, ``log p(x) = logsumexp_k log p_hat(x, k)``; it is
checked against brute-force numerical integration on a model with a 1-D latent, and on a trained
run against an importance sampler written out here from the model's distributions (no Pyro
traces), each with a tolerance derived from the estimator's own spread.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F

from ppl_vae import ConfigError
from ppl_vae.cli import main
from ppl_vae.kinds.m2 import LOG_LIKELIHOOD_SAMPLES, TRAIN_LOG_LIKELIHOOD_SAMPLES
from ppl_vae.runs.reopen import evaluate, load_run
from ppl_vae.ssl import build_ssvae, fit_ssl


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    """A tiny M2 run on digits (20 labels, 300 training points, 2 epochs)."""
    out = tmp_path_factory.mktemp("m2") / "run"
    with pyro.validation_enabled(True):
        result = fit_ssl(
            labels=20, max_train=300, epochs=2, elbo_samples=2, out=out, quiet=True, device="cpu"
        )
    return out, result


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


# -- the estimator: log p(x) with y summed out exactly -----------------------------------------
def _tiny_m2() -> torch.nn.Module:
    """Two classes with unequal prior mass, 8 binary pixels, a 1-D latent: p(x) by quadrature."""
    torch.manual_seed(0)
    model = build_ssvae(
        (8,), 2, likelihood="bernoulli", latent_dim=1, hidden_dims=(8,), class_probs=[0.7, 0.3]
    )
    with torch.no_grad():  # a decoder that makes the posterior differ from the prior
        for p in model.decoder.parameters():
            p.mul_(3.0)
    return model.eval()


@torch.no_grad()
def _log_px_by_quadrature(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    r""":math:`\log \sum_k \pi_k \int p(z)\, p(x \mid z, k)\, dz` on a grid over z in [-10, 10]
    (float64; the prior's mass outside is below 1e-22, the grid error below 1e-6)."""
    m = copy.deepcopy(model).double()
    grid = torch.linspace(-10.0, 10.0, 8001, dtype=torch.float64)[:, None]
    dz = 20.0 / 8000
    log_pz = m.prior().log_prob(grid)  # (G,)
    cols = []
    for k in range(m.num_classes):
        y = F.one_hot(torch.full((len(grid),), k), m.num_classes).double()
        lik = m.likelihood(m.decoder(m.prior.embed(grid), y))
        log_px_z = torch.stack([lik.log_prob(xi.double().expand(len(grid), -1)) for xi in x], 1)
        cols.append(m.class_logits[k] + torch.logsumexp(log_pz[:, None] + log_px_z, 0))
    return (torch.stack(cols, -1).logsumexp(-1) + math.log(dz)).float()


def test_log_likelihood_converges_to_numerical_integration():
    model = _tiny_m2()
    x = torch.bernoulli(torch.full((6, 8), 0.5))
    exact = _log_px_by_quadrature(model, x)
    # 20 independent estimates with 500 z per class: their mean is within 5 standard errors
    # (from their own spread; 19 degrees of freedom: a false failure about once in 10^4 per
    # point) plus 1e-3 (the estimator's O(1/S) bias is ~1e-4 here, float32 rounding less).
    est = torch.stack([model.log_likelihood(x, num_samples=500) for _ in range(20)])
    se = est.std(0) / math.sqrt(len(est))
    tol = 5 * se + 1e-3
    assert bool((se < 0.02).all()), se  # the check has power: tol is well below the errors below
    assert bool(((est.mean(0) - exact).abs() < tol).all()), (est.mean(0), exact, tol)
    # What the errors of plausible mistakes would be; each is far outside the tolerance:
    per_class = model.log_joint_per_class(x, num_samples=500)
    assert per_class.shape == (6, 2)
    wrong = {
        "mean over classes": per_class.logsumexp(-1) - math.log(2),
        "classes weighted uniformly": (per_class - model.class_logits + math.log(0.5)).logsumexp(
            -1
        ),
        "ELBO per class, not importance sampling": model.elbo_per_class(x, 500).logsumexp(-1),
    }
    for name, value in wrong.items():
        assert bool(((value - exact).abs() > 2 * tol).all()), name
    # more samples, a tighter bound (in expectation; the gap at S = 1 is the per-class ELBO's)
    assert float(model.log_likelihood(x, 1).mean()) < float(est.mean())


def test_log_likelihood_is_above_the_unlabelled_elbo_on_the_tiny_model():
    model = _tiny_m2()
    x = torch.bernoulli(torch.full((50, 8), 0.5))
    assert float(model.log_likelihood(x, 200).mean()) > float(model.unlabelled_elbo(x, 200).mean())


@torch.no_grad()
def _independent_log_px(model: torch.nn.Module, x: torch.Tensor, s: int) -> torch.Tensor:
    """Importance sampling written out from the model's distributions (no Pyro traces)."""
    n, k = len(x), model.num_classes
    cols = []
    for c in range(k):
        y = F.one_hot(torch.full((n,), c), k).to(x.dtype)
        q = model.q_z(x, y)
        z = q.sample((s,))  # (S, N, D)
        zf = z.reshape(s * n, -1)
        lik = model.likelihood(model.decoder(model.prior.embed(zf), y.repeat(s, 1)))
        log_px = lik.log_prob(x.repeat(s, *([1] * (x.dim() - 1)))).reshape(s, n)
        log_pz = model.prior().log_prob(zf).reshape(s, n)
        lw = model.class_logits[c] + log_pz + log_px - q.log_prob(z)
        cols.append(torch.logsumexp(lw, 0) - math.log(s))
    return torch.stack(cols, -1).logsumexp(-1)


# -- evaluate on an M2 run --------------------------------------------------------------------
def test_evaluate_reproduces_the_runs_accuracy_and_bounds_the_elbo(m2_run):
    run_dir, result = m2_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = evaluate(run_dir, device="cpu")
    # the same weights (best.pt) and a deterministic classifier: exactly the run's numbers
    assert out["kind"] == "m2" and out["weights"].startswith("best.pt")
    assert out["epoch"] == metrics["best_epoch"]
    for key in ("test_accuracy", "per_class_accuracy", "confusion_matrix"):
        assert out[key] == metrics[key], key
    assert out["log_likelihood_samples"] == LOG_LIKELIHOOD_SAMPLES
    assert math.isfinite(out["test_log_likelihood"])
    assert out["test_log_likelihood"] >= out["test_elbo"]
    assert (run_dir / "evaluation.json").is_file()
    with open(run_dir / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == out["num_test_points"] == len(result.dataset.test_x)
    # metrics.json (at the end of training) has the same estimator with fewer samples
    assert metrics["log_likelihood_samples"] == TRAIN_LOG_LIKELIHOOD_SAMPLES
    assert math.isfinite(metrics["test_log_likelihood"]) and metrics["test_log_likelihood_se"] > 0
    assert metrics["test_log_likelihood"] >= metrics["test_elbo"]


def test_evaluate_matches_an_importance_sampler_written_out(m2_run):
    run_dir, _ = m2_run
    run = load_run(run_dir, device="cpu")
    k = 50
    out = evaluate(run_dir, num_samples=k, device="cpu", write=False)
    with pyro.settings.context(module_local_params=True):
        mine = _independent_log_px(run.model, run.test_x, k)
        theirs = run.model.log_likelihood(run.test_x, k)
    # two independent draws of the same estimator: per-point differences have mean 0; their
    # mean is within 5 standard errors (a false failure about once in 10^6)
    diff = theirs - mine
    se = float(diff.std() / math.sqrt(len(diff)))
    assert se < 0.1  # tight enough to see a log 10 = 2.3 nats mistake in the class sum
    assert abs(float(diff.mean())) < 5 * se, (float(diff.mean()), se)
    assert abs(out["test_log_likelihood"] - float(mine.mean())) < 5 * math.sqrt(2) * se + 5 * float(
        mine.std() / math.sqrt(len(mine))
    )


def test_load_run_rebuilds_the_split_and_loads_the_best_weights(m2_run, tmp_path):
    run_dir, result = m2_run
    run = load_run(run_dir, device="cpu")
    assert run.kind == "m2" and run.config.kind == "m2"
    np.testing.assert_array_equal(run.labelled, result.labelled)
    assert torch.equal(run.dataset.test_x, result.dataset.test_x)
    best = torch.load(run_dir / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(v, best[n]) for n, v in run.model.state_dict().items())
    with pytest.raises(AttributeError, match=r"kind 'm2'.*\.model"):
        _ = run.vae
    # the last epoch's weights in checkpoint.pt are not the ones evaluated
    copy_dir = _copy(run_dir, tmp_path)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        state = torch.load(copy_dir / name, weights_only=True)
        state["model"] = {
            n: v + 1.0 if v.is_floating_point() else v for n, v in state["model"].items()
        }
        torch.save(state, copy_dir / name)
    moved = load_run(copy_dir, device="cpu")
    assert all(torch.equal(v, best[n]) for n, v in moved.model.state_dict().items())
    # without best.pt, the checkpoint's copy of the best-validation weights
    (copy_dir / "best.pt").unlink()
    again = load_run(copy_dir, device="cpu")
    assert again.weights.startswith("checkpoint.pt") and again.epoch == run.epoch
    assert all(torch.equal(v, best[n]) for n, v in again.model.state_dict().items())


def test_evaluate_on_another_test_file_with_and_without_labels(m2_run, tmp_path):
    run_dir, result = m2_run
    ds = result.dataset
    x = ds.test_x[:40].cpu().numpy()
    y = ds.test_y[:40].cpu().numpy()
    np.savez(tmp_path / "labelled.npz", x=x, y=y)
    np.save(tmp_path / "unlabelled.npy", x)
    with_labels = evaluate(run_dir, num_samples=5, test_data=str(tmp_path / "labelled.npz"))
    model_pred = load_run(run_dir, device="cpu").model.predict(ds.test_x[:40])
    assert with_labels["test_accuracy"] == float((model_pred == ds.test_y[:40]).float().mean())
    without = evaluate(run_dir, num_samples=5, test_data=str(tmp_path / "unlabelled.npy"))
    assert "test_accuracy" not in without and "confusion_matrix" not in without
    assert math.isfinite(without["test_log_likelihood"]) and without["num_test_points"] == 40
    assert (run_dir / "evaluation_scores.csv").is_file()


# -- the command line -------------------------------------------------------------------------
def test_cli_evaluate_and_sample_on_an_m2_run(m2_run, tmp_path, capsys):
    run_dir, result = m2_run
    assert main(["evaluate", str(run_dir), "--log-likelihood-samples", "5", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["log_likelihood_samples"] == 5 and "test_accuracy" in out
    target = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "-n", "3", "--out", str(target)]) == 0
    x = np.load(target)
    assert x.shape == (10, 3, *result.dataset.data_shape)  # (classes, samples per class, ...)
    assert target.with_suffix(".png").is_file()
    # the default: 10 per class into the run directory; --draw samples p(x | z, y)
    assert main(["sample", str(run_dir), "--draw", "--seed", "1"]) == 0
    drawn = np.load(run_dir / "samples_n10_per_class.npy")
    assert drawn.shape == (10, 10, *result.dataset.data_shape)
    assert (run_dir / "samples_n10_per_class.png").is_file()


def _one_line_usage_error(argv: list[str], capsys, message: str) -> None:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = int(e.code)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_bad_input_on_m2_runs_is_one_line(m2_run, tmp_path, capsys):
    run_dir, _ = m2_run
    _one_line_usage_error(["evaluate", str(tmp_path / "nothing")], capsys, "does not exist")
    bad = _copy(run_dir, tmp_path)
    # a config that builds another model than the one the weights were trained in
    text = (bad / "config.toml").read_text().replace("latent_dim = 16", "latent_dim = 3")
    (bad / "config.toml").write_text(text)
    for sub in ("evaluate", "sample"):
        # (the recorded module printout differs first: "another architecture than ... builds")
        _one_line_usage_error([sub, str(bad)], capsys, "the one its config builds")
    shutil.rmtree(bad)
    # same shapes, another activation: never loaded silently into the other architecture
    bad = _copy(run_dir, tmp_path)
    text = (bad / "config.toml").read_text()
    assert "encoder_args = {}" in text
    text = text.replace("encoder_args = {}", 'encoder_args = { activation = "softplus" }')
    (bad / "config.toml").write_text(text)
    _one_line_usage_error(["evaluate", str(bad)], capsys, "another architecture")
    (bad / "best.pt").unlink()  # the checkpoint's copy of the best weights is checked alike
    _one_line_usage_error(["evaluate", str(bad)], capsys, "another architecture")
    shutil.rmtree(bad)
    bad = _copy(run_dir, tmp_path)
    (bad / "best.pt").write_bytes(b"\x00garbage")
    _one_line_usage_error(["evaluate", str(bad)], capsys, "truncated or corrupted")
    np.save(tmp_path / "wide.npy", np.zeros((5, 10), dtype=np.float32))
    _one_line_usage_error(
        ["evaluate", str(run_dir), "--test-data", str(tmp_path / "wide.npy")], capsys, "shape"
    )
    np.savez(tmp_path / "bad_labels.npz", x=np.zeros((5, 64), np.float32), y=np.full(5, 12))
    _one_line_usage_error(
        ["evaluate", str(run_dir), "--test-data", str(tmp_path / "bad_labels.npz")],
        capsys,
        "must be in [0, 10)",
    )
    _one_line_usage_error(
        ["evaluate", str(run_dir), "--log-likelihood-samples", "0"], capsys, "must be a positive"
    )
    _one_line_usage_error(["sample", str(run_dir), "-n", "0"], capsys, "-n must be positive")
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "nothing")
