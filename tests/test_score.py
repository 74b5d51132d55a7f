"""Anomaly scoring (``ppl-vae score``) and evaluation sized by a memory budget.

Independent computations: AUROC by counting pairs and AUPRC by its step-sum definition on
planted scores; the per-point log p(x) of :func:`ppl_vae.inference.scoring.score` with the same
seed; the Gaussian KL in closed form; a Monte Carlo KL against quadrature; bytes of known
allocations; the budgeted estimate against the one-chunk estimate.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pyro
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ppl_vae import build_vae, fit
from ppl_vae.cli import main
from ppl_vae.inference.scoring import (
    TensorMemory,
    parse_memory,
    pass_memory,
    per_point_terms,
    plan_chunks,
    score,
)
from ppl_vae.runs.reopen import load_run
from ppl_vae.runs.score import anomaly_metrics, score_run
from ppl_vae.training.setup import prepare_data

K = 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("score") / "run"
    fit(
        epochs=2,
        max_train=300,
        hidden_dims=[32],
        latent_dim=4,
        log_likelihood_samples=K,
        quiet=True,
        figures=False,
        out=d,
        latent_diagnostics=False,
    )
    return d


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _column(rows, name):
    return np.array([float(r[name]) for r in rows])


# -- AUROC / AUPRC -----------------------------------------------------------------------------
def _auroc_by_pairs(outlier, s):
    pos, neg = s[outlier == 1], s[outlier == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _auprc_by_steps(outlier, s):
    """Average precision, sum_n (R_n - R_{n-1}) P_n over the distinct thresholds."""
    order = np.argsort(-s, kind="stable")
    y = outlier[order]
    tp = np.cumsum(y)
    precision, recall = tp / np.arange(1, len(y) + 1), tp / y.sum()
    last = np.r_[np.diff(s[order]) != 0, True]  # the last point of each tied group
    r, p = recall[last], precision[last]
    return float(np.sum(np.diff(np.r_[0.0, r]) * p))


def test_auroc_and_auprc_of_planted_scores_match_sklearn_and_the_definitions():
    rng = np.random.default_rng(0)
    outlier = (rng.random(300) < 0.2).astype(np.int64)
    # planted: outliers have lower log p(x) / ELBO / recon and a higher KL, by varying margins
    ll = rng.normal(0, 1, 300) - 1.5 * outlier
    cols = {
        "log_likelihood": ll,
        "elbo": ll - rng.random(300),
        "recon": rng.normal(0, 1, 300) - 0.3 * outlier,
        "kl": np.round(rng.normal(0, 1, 300) + 0.8 * outlier, 1),  # ties
    }
    got = anomaly_metrics(outlier, cols)
    for name, (col, sign) in {
        "log_likelihood": ("log_likelihood", -1),
        "elbo": ("elbo", -1),
        "reconstruction_error": ("recon", -1),
        "kl": ("kl", 1),
    }.items():
        s = sign * cols[col]
        assert got[name]["auroc"] == pytest.approx(roc_auc_score(outlier, s), abs=1e-12)
        assert got[name]["auroc"] == pytest.approx(_auroc_by_pairs(outlier, s), abs=1e-12)
        assert got[name]["auprc"] == pytest.approx(average_precision_score(outlier, s), abs=1e-12)
        assert got[name]["auprc"] == pytest.approx(_auprc_by_steps(outlier, s), abs=1e-12)
        assert got[name]["auroc"] > 0.55  # oriented: the planted outliers score as anomalies
    perfect = anomaly_metrics(outlier, {**cols, "log_likelihood": -outlier * 10.0})
    assert perfect["log_likelihood"] == {"auroc": 1.0, "auprc": 1.0}


# -- the per-point CSV -------------------------------------------------------------------------
def test_csv_log_likelihood_is_score_with_the_same_seed_and_kl_is_the_closed_form(
    run_dir, tmp_path
):
    out = tmp_path / "s"
    summary = score_run(run_dir, "test", num_samples=K, term_samples=7, out=out, device="cpu")
    rows = _csv(out / "scores.csv")
    run = load_run(run_dir, device="cpu")
    cfg = run.config
    x = prepare_data(run.dataset, run.model, cfg.binarize, cfg.split_seed)[2]
    pyro.set_rng_seed(cfg.seed)
    ref = score(run.model, x, num_samples=K, chunk_size=cfg.log_likelihood_chunk)
    assert len(rows) == x.shape[0] == summary["num_points"]
    np.testing.assert_allclose(
        _column(rows, "log_likelihood"), ref.log_likelihood.numpy(), atol=2e-6, rtol=0
    )  # the CSV has 6 decimals
    np.testing.assert_allclose(_column(rows, "elbo"), ref.elbo.numpy(), atol=2e-6, rtol=0)
    # KL(N(m, s) || N(m0, s0)) per dimension, summed: the mean-field Gaussian VAE's closed form
    with torch.no_grad():
        q = run.model.encoder(x).base_dist
        p = run.model.prior().base_dist
        m, s, m0, s0 = q.loc, q.scale, p.loc, p.scale
        kl = (torch.log(s0 / s) + (s**2 + (m - m0) ** 2) / (2 * s0**2) - 0.5).sum(-1)
    np.testing.assert_allclose(_column(rows, "kl"), kl.double().numpy(), atol=2e-6, rtol=1e-5)
    assert summary["kl_method"] == {"z": "analytic"}
    # bits/dim of the Bernoulli (a pmf): -log p(x) / (D ln 2)
    np.testing.assert_allclose(
        _column(rows, "bits_per_dim"),
        -_column(rows, "log_likelihood") / (64 * math.log(2)),
        atol=1e-5,
    )
    assert [r["label"] for r in rows] == [str(int(v)) for v in run.dataset.test_y]


def test_monte_carlo_kl_where_there_is_no_closed_form():
    """q = N(0.5, 0.8), p = StudentT(3): no registered KL, so log q - log p of the draws is
    averaged; it must agree with the KL by quadrature within 5 standard errors (S = 4000)."""

    class Pair(torch.nn.Module):
        def model(self, x):
            with pyro.plate("data", x.shape[0], dim=-1):
                z = pyro.sample("z", pyro.distributions.StudentT(3.0, 0.0, 1.0))
                pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)

        def guide(self, x):
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", pyro.distributions.Normal(0.5 + 0 * x, 0.8))

    q, p = torch.distributions.Normal(0.5, 0.8), torch.distributions.StudentT(3.0)
    grid = torch.linspace(-8, 9, 200_001, dtype=torch.float64)
    lq = q.log_prob(grid)
    exact = float(torch.trapezoid(lq.exp() * (lq - p.log_prob(grid)), grid))
    draws = q.sample((20_000,))
    sd = float((q.log_prob(draws) - p.log_prob(draws)).std())
    terms = per_point_terms(Pair(), torch.zeros(3), num_samples=4000)
    assert terms.analytic == {"z": False}
    assert (terms.kl["z"] - exact).abs().max() < 5 * sd / math.sqrt(4000), (terms.kl, exact)


# -- new data, bad data ------------------------------------------------------------------------
def test_a_named_data_run_scores_a_npy_file_like_its_own_split(run_dir, tmp_path, capsys):
    run = load_run(run_dir, device="cpu")
    f = tmp_path / "new.npy"
    np.save(f, run.dataset.test_x.numpy())  # digits' values k/16, float32: the run's grid
    assert (
        main(
            [
                "score",
                str(run_dir),
                "--data",
                str(f),
                "--out",
                str(tmp_path / "a"),
                "--log-likelihood-samples",
                str(K),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "score",
                str(run_dir),
                "--data",
                "test",
                "--out",
                str(tmp_path / "b"),
                "--log-likelihood-samples",
                str(K),
                "--quiet",
            ]
        )
        == 0
    )
    a, b = _csv(tmp_path / "a" / "scores.csv"), _csv(tmp_path / "b" / "scores.csv")
    assert len(a) == run.dataset.test_x.shape[0]
    # same points, binarised by the run's test stream, same seed: the same scores
    for col in ("log_likelihood", "elbo", "recon", "kl"):
        np.testing.assert_array_equal(_column(a, col), _column(b, col))
    assert "scored" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda d: np.save(d / "x.npy", np.zeros((5, 60), np.float32)),
            "have points of shape (60,) but run",
        ),
        (
            lambda d: np.save(d / "x.npy", np.full((5, 64), 16.0, np.float32)),
            "binarises its data, which must lie in [0, 1]",
        ),
    ],
)
def test_bad_data_is_one_line_and_exit_2(run_dir, tmp_path, capsys, make, message):
    make(tmp_path)
    rc = main(
        ["score", str(run_dir), "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("ppl-vae score: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "o").exists()


def test_refusals_are_one_line(run_dir, tmp_path, capsys):
    m2 = tmp_path / "m2"
    m2.mkdir()
    (m2 / "config.toml").write_text('kind = "m2"\n')
    cases = [
        ([str(m2)], "is an M2 run"),
        ([str(run_dir), "--outlier-classes", "9", "--labels", "l.npy"], "not both"),
        ([str(run_dir), "--eval-memory", "lots"], "a memory size must be"),
        ([str(run_dir), "--data", str(tmp_path / "none.npy")], "--data must be 'test' or 'val'"),
    ]
    for argv, message in cases:
        assert main(["score", *argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_outlier_classes_give_auroc_a_figure_and_no_silent_overwrite(run_dir, tmp_path):
    out = tmp_path / "o"
    s = score_run(
        run_dir, "test", outlier_classes=[9], num_samples=5, term_samples=2, out=out, device="cpu"
    )
    rows = _csv(out / "scores.csv")
    outlier = np.array([int(r["outlier"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    np.testing.assert_array_equal(outlier, labels == 9)
    assert s["outliers"]["num_outliers"] == int((labels == 9).sum()) > 0
    want = roc_auc_score(outlier, -_column(rows, "recon"))
    assert s["anomaly"]["reconstruction_error"]["auroc"] == pytest.approx(want, abs=1e-4)
    assert (out / "histograms.png").stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["anomaly"] == s["anomaly"]
    with pytest.raises(Exception, match="exists; pass --overwrite"):
        score_run(run_dir, "test", num_samples=2, out=out, device="cpu")
    score_run(run_dir, "test", num_samples=2, term_samples=1, out=out, device="cpu", overwrite=True)
    assert "anomaly" not in json.loads((out / "summary.json").read_text())


# -- memory budget -----------------------------------------------------------------------------
def test_tensor_memory_counts_live_bytes_and_not_views_or_inputs():
    x = torch.ones(10_000)
    with torch.no_grad(), TensorMemory() as mem:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(2000)  # + 8000 = 12000: the peak
        del a
        c = b.view(40, 50) + x[:2000].reshape(40, 50)  # 8000 + 8000 (views add nothing)
        del b, c
        d = torch.ones(500)
    assert mem.peak == 16_000
    assert mem.current == 2000  # only d is alive
    del d
    assert mem.current == 0


def test_parse_memory():
    assert parse_memory("1GB") == 10**9
    assert parse_memory("512MiB") == 2**29
    assert parse_memory("1.5 kB") == 1500
    assert parse_memory(4096) == 4096
    for bad in ("lots", "-1MB", "0", True, "1 parsecs"):
        with pytest.raises(Exception, match="memory size"):
            parse_memory(bad)


def _digits_points(n):
    from ppl_vae import load_data

    x = load_data("digits").test_x[:n]
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(0))


def test_default_budget_keeps_the_fixed_chunk_of_the_default_mlp_on_digits():
    vae = build_vae((64,)).eval()  # the default network: 64-256-128-10
    x = _digits_points(360)
    plan = plan_chunks(vae, x, 1000)
    assert (plan.particles, plan.points) == (100, x.shape[0])
    assert plan.estimate < plan.budget
    pyro.set_rng_seed(3)
    fixed = score(vae, x, num_samples=300, eval_memory=None)
    pyro.set_rng_seed(3)
    budgeted = score(vae, x, num_samples=300)  # the probe draws nothing
    assert torch.equal(fixed.log_likelihood, budgeted.log_likelihood)
    assert torch.equal(fixed.elbo, budgeted.elbo)


def test_a_tiny_budget_cuts_the_chunk_and_keeps_the_estimate():
    vae = build_vae((64,), hidden_dims=(64,)).eval()
    x = _digits_points(48)  # 48 points x 10 latent dims: a multiple of 16 (same draws)
    k = 200
    budget = 3 * pass_memory(vae, x[:16], 8)[0]  # about 8 particles x 48 points
    plan = plan_chunks(vae, x, k, eval_memory=budget)
    assert 1 < plan.particles < 100 and plan.points == 48, plan
    assert plan.estimate <= budget
    assert pass_memory(vae, x, plan.particles)[0] <= budget  # the bound holds
    pyro.set_rng_seed(5)
    one_chunk = score(vae, x, num_samples=k, chunk_size=k, eval_memory=None)
    pyro.set_rng_seed(5)
    cut = score(vae, x, num_samples=k, eval_memory=budget)
    assert cut.plan == plan
    # float32 logsumexp of one chunk vs a running logaddexp over 200 / plan.particles chunks
    torch.testing.assert_close(cut.log_likelihood, one_chunk.log_likelihood, atol=1e-4, rtol=0)
    torch.testing.assert_close(cut.elbo, one_chunk.elbo, atol=1e-4, rtol=0)
    # below one particle per point: fewer points per pass, still within the budget
    small = pass_memory(vae, x[:16], 1)[0]
    plan = plan_chunks(vae, x, k, eval_memory=small)
    assert plan.particles == 1 and plan.points < 48
    assert pass_memory(vae, x[: plan.points], 1)[0] <= small
