"""Estimator comparison: SNR measurement, undisturbed trajectories, outputs, CLI, example."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from scipy.special import gammaln

import ppl_vae.train as train_module
from ppl_vae import ConfigError, FitConfig, fit
from ppl_vae.cli.common import EXIT_USAGE, Parser
from ppl_vae.cli.compare import register
from ppl_vae.inference.estimators import make_elbo
from ppl_vae.runs.compare import (
    KHAT_THRESHOLD,
    _build_like_fit,
    _fixed_batch,
    _GradientProbe,
    _khat,
    _load_dataset,
    compare_estimators,
    gradient_statistics,
    initial_weights_digest,
    preserved_rng,
)

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on digits: every run trains in well under a second.
TINY = dict(
    max_train=100,
    hidden_dims=[8],
    latent_dim=2,
    batch_size=50,
    epochs=2,
    log_likelihood_samples=10,
    device="cpu",
)
ALL_ESTIMATORS = ["trace", "meanfield", "tracegraph", "iwae:2", "renyi:0.5", "stl", "dreg:2"]


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz's once-a-day refactor notice
        import arviz

    return arviz


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- gradient statistics ----------------------------------------------------------------------
def test_snr_matches_closed_form_on_a_toy_gradient() -> None:
    r"""g_j = mu_j + sigma_j * eps_j, so SNR_j = |mu_j| / sigma_j and Var g_j = sigma_j^2.

    For normal g, the sample mean and sd are independent and E[1/s] = c(nu) / sigma with
    c(nu) = sqrt(nu/2) Gamma((nu-1)/2) / Gamma(nu/2), nu = R - 1 (the small-sample bias of 1/s,
    0.4% at R = 200); |mu_j| sqrt(R) / sigma_j >= 7 makes the folding of |mean| negligible.
    The per-parameter ratios SNR_hat_j / (c SNR_j) and var_hat_j / sigma_j^2 are independent
    across j with mean 1: their averages over P = 400 parameters must be within 5 standard
    errors of 1 (estimated from their spread); the SNR average is also within 3% of the plain
    closed form |mu| / sigma.
    """
    torch.manual_seed(0)
    p, repeats = 400, 200
    mu = torch.linspace(0.5, 2.0, p, dtype=torch.float64) * torch.tensor([1.0, -1.0]).repeat(p // 2)
    sigma = torch.linspace(2.0, 0.5, p, dtype=torch.float64)
    theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
    const = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # gradient 1 every time

    def loss() -> torch.Tensor:
        return ((mu + sigma * torch.randn(p, dtype=torch.float64)) * theta).sum() + const.sum()

    stats = gradient_statistics(loss, {"theta": [theta], "const": [const]}, repeats)
    assert theta.grad is None and const.grad is None  # .grad untouched

    nu = repeats - 1
    c = math.exp(0.5 * math.log(nu / 2) + gammaln((nu - 1) / 2) - gammaln(nu / 2))
    truth = mu.abs() / sigma
    ratio = stats["theta"].snr / (c * truth)
    se = float(ratio.std()) / math.sqrt(p)
    assert abs(float(ratio.mean()) - 1) < 5 * se, (float(ratio.mean()), se)
    summary = stats["theta"].summary()
    assert summary["snr"] == pytest.approx(float(truth.mean()), rel=0.03)
    var_ratio = stats["theta"].variance / sigma**2
    se_var = float(var_ratio.std()) / math.sqrt(p)
    assert abs(float(var_ratio.mean()) - 1) < 5 * se_var
    assert summary["variance"] == pytest.approx(float(stats["theta"].variance.mean()))
    # A gradient that never varies has no SNR: it is counted, not averaged in.
    const_summary = stats["const"].summary()
    assert const_summary["num_constant"] == 3 and math.isnan(const_summary["snr"])
    assert torch.allclose(stats["const"].mean, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("shape", [0.3, 0.5, 0.8, 1.2])
def test_khat_recovers_the_shape_of_a_known_pareto_tail(shape: float) -> None:
    r"""PSIS k-hat of importance weights drawn from a Pareto tail of known shape.

    :math:`w = U^{-k}` with :math:`U` uniform is Pareto with tail index :math:`1/k`, whose
    generalised-Pareto tail shape is exactly :math:`k` (here with a random constant per row: k-hat
    must not depend on how the weights are normalised). 40 rows of 10,000 weights: arviz fits its
    generalised Pareto to the 300 largest of each, with a per-row sd of 0.06-0.11 and so a mean
    over the rows within ~0.02 (one SE) of its expectation; the Zhang-Stephens estimate it uses is
    biased by up to ~0.04 at this tail size (measured: means 0.312, 0.490, 0.760, 1.180). The
    tolerance, 0.08 on the mean, is four SE plus that bias. Weights negated before the fit (1/w,
    a light tail) give k-hat near -0.93, and every row must classify like the truth against 0.7
    where the truth is far from it (0.3 and 1.2).
    """
    rng = np.random.default_rng(int(shape * 10))
    lw = -shape * np.log(rng.uniform(size=(40, 10_000))) + rng.normal(size=(40, 1))
    k = _khat(lw)
    assert k is not None and k.shape == (40,)
    assert abs(float(k.mean()) - shape) < 0.08, (k.mean(), shape)
    if abs(shape - KHAT_THRESHOLD) > 0.3:
        assert bool(((k > KHAT_THRESHOLD) == (shape > KHAT_THRESHOLD)).all()), k
    # the same numbers arviz's psislw gives on these log weights, row by row (reff = 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, theirs = _arviz().psislw(lw, reff=1.0)
    np.testing.assert_allclose(k, np.asarray(theirs).reshape(-1), rtol=1e-12, atol=0)


def test_gradient_statistics_rejects_one_repeat() -> None:
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(ConfigError, match="grad_repeats"):
        gradient_statistics(lambda: theta.sum(), {"t": [theta]}, 1)


def test_preserved_rng_restores_every_generator() -> None:
    """torch, NumPy's global generator and Python's random continue as if nothing had drawn."""
    import random

    def draw() -> tuple:
        return torch.rand(3), np.random.rand(3), random.random()  # noqa: NPY002

    pyro.set_rng_seed(3)
    with preserved_rng():
        pyro.set_rng_seed(99)
        draw()
    after = draw()
    pyro.set_rng_seed(3)
    expected = draw()
    assert torch.equal(after[0], expected[0])
    assert np.array_equal(after[1], expected[1]) and after[2] == expected[2]


@pytest.mark.parametrize("estimator", ["trace", "dreg:2"])
def test_gradient_probe_does_not_change_the_training_trajectory(estimator: str) -> None:
    """History (all but wall time) and final weights are bit-identical with and without probes."""
    cfg = FitConfig(estimator=estimator, **{**TINY, "epochs": 3})
    data = _load_dataset(cfg, 0)
    batch = _fixed_batch(data.train_x, 20, dynamic=True, data_seed=0)

    def run(probe: _GradientProbe | None) -> tuple[list[dict[str, float]], dict]:
        res = fit(cfg, dataset=data, quiet=True, figures=False, on_epoch_end=probe)
        hist = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
        return hist, {k: v.clone() for k, v in res.vae.state_dict().items()}

    probe = _GradientProbe(make_elbo(estimator, 1), batch, points=(1, 2, 3), repeats=4, seed=0)
    hist_probed, state_probed = run(probe)
    hist_plain, state_plain = run(None)
    assert sorted(probe.results) == [1, 2, 3]
    assert all(math.isfinite(v) for r in probe.results.values() for v in r.values())
    assert hist_probed == hist_plain
    assert all(torch.equal(state_probed[k], state_plain[k]) for k in state_plain)


# -- the comparison ---------------------------------------------------------------------------
def test_unknown_estimator_fails_before_any_training(tmp_path: Path, monkeypatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("fit() was called")

    monkeypatch.setattr("ppl_vae.runs.compare.fit", no_training)
    out = tmp_path / "cmp"
    with pytest.raises(ConfigError, match="Unknown estimator 'trcae'"):
        compare_estimators(["trace", "trcae"], [0], out=out, **TINY)
    with pytest.raises(ConfigError, match="positive integer"):
        compare_estimators(["iwae:0"], [0], out=out, **TINY)
    with pytest.raises(ConfigError, match="more than once"):
        compare_estimators(["iwae:2", "IWAE:2.0"], [0], out=out, **TINY)
    with pytest.raises(ConfigError, match="grad_points"):
        compare_estimators(["trace"], [0], out=out, grad_points=[5], **TINY)
    with pytest.raises(ConfigError, match="seeds"):
        compare_estimators(["trace"], [], out=out, **TINY)
    assert not out.exists()  # nothing written, nothing trained


def test_existing_output_needs_overwrite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("ppl_vae.runs.compare.fit", lambda *a, **k: pytest.fail("fit() was called"))
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="overwrite"):
        compare_estimators(["trace"], [0], out=tmp_path, **TINY)
    assert (tmp_path / "notes.txt").read_text() == "keep"


def _grad_columns(points: list[int]) -> list[str]:
    return [
        f"{kind}_{group}_e{e}"
        for e in points
        for kind in ("snr", "grad_var")
        for group in ("encoder", "decoder")
    ]


BASE_COLUMNS = [
    "estimator",
    "seed",
    "num_particles",
    "status",
    "test_elbo",
    "test_log_likelihood",
    "test_log_likelihood_se",
    "final_val_elbo",
    "seconds_per_epoch",
    "khat_mean",
    "khat_max",
    "khat_frac_above_0.7",
    "init_digest",
]


def _check_outputs(out: Path, estimators: list[str], seeds: list[int], extra: list[str]) -> None:
    rows = _read_csv(out / "compare.csv")
    assert [(r["estimator"], int(r["seed"])) for r in rows] == [
        (e, s) for e in estimators for s in seeds
    ]
    columns = BASE_COLUMNS + _grad_columns([1, 2]) + extra
    for r in rows:
        missing = [c for c in columns if r.get(c, "") == ""]
        assert not missing, (r["estimator"], missing)
        assert r["status"] == "ok"
        for c in [c for c in columns if c not in ("estimator", "status", "init_digest")]:
            assert math.isfinite(float(r[c])), (r["estimator"], c, r[c])
        # the row reports its run's own evaluation (metrics.json in its run directory; the CSV
        # rounds to 4 decimals)
        run_metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        for key in ("test_elbo", "test_log_likelihood", "test_log_likelihood_se"):
            assert float(r[key]) == pytest.approx(run_metrics[key], abs=1e-4), (r["estimator"], key)
        # both from the same importance weights: Jensen holds exactly (up to the rounding), next
        # to the check above
        assert float(r["test_log_likelihood"]) >= float(r["test_elbo"]) - 1e-4
    md = (out / "compare.md").read_text()
    for e in estimators:
        assert f"| `{e}` |" in md
    if len(seeds) > 1:
        assert "±" in md  # mean ± sd over the seeds
    for name in ("elbo_vs_time.png", "snr_vs_k.png", "khat.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    khat_rows = _read_csv(out / "khat.csv")
    assert len(khat_rows) == len(rows) * 8
    az = _arviz()
    for e in estimators:
        path = out / "runs" / f"{e.replace(':', '-')}-seed{seeds[0]}" / "posterior.nc"
        data = az.from_netcdf(str(path))
        assert data.posterior["z"].shape == (1, 10, 2, 2)  # chain, draw, test point, latent dim
        assert data.sample_stats["log_weight"].shape == (1, 10, 2)
        assert data.observed_data["x"].shape == (2, 64)
        assert data.attrs["estimator"] == e


SMALL = dict(
    grad_points=[1, 2],
    grad_repeats=4,
    grad_batch_size=20,
    khat_points=8,
    khat_samples=30,
    posterior_points=2,
    posterior_draws=10,
)


@pytest.mark.slow
def test_compare_in_process_every_estimator(tmp_path: Path, monkeypatch) -> None:
    """All columns for every estimator; fit's real initial weights equal across estimators."""
    built: list[str] = []
    real_build = train_module.build_config_vae

    def recording_build(*args, **kwargs):
        vae = real_build(*args, **kwargs)
        built.append(initial_weights_digest(vae))
        return vae

    monkeypatch.setattr(train_module, "build_config_vae", recording_build)
    out = tmp_path / "cmp"
    res = compare_estimators(ALL_ESTIMATORS, [0, 1], out=out, isolate=False, **SMALL, **TINY)
    _check_outputs(out, ALL_ESTIMATORS, [0, 1], extra=[])
    assert "not measured" in (out / "compare.md").read_text()  # no memory number in-process
    assert not any(c.startswith("rss_") for c in res.rows[0])
    # The weights fit() actually started from, one per run, in run order (estimator-major):
    assert len(built) == len(res.rows)
    for row, digest in zip(res.rows, built):
        assert row["init_digest"] == digest
    by_seed = {s: {d for r, d in zip(res.rows, built) if r["seed"] == s} for s in (0, 1)}
    assert len(by_seed[0]) == 1 and len(by_seed[1]) == 1 and by_seed[0] != by_seed[1]


@pytest.mark.slow
def test_compare_isolated_measures_memory(tmp_path: Path) -> None:
    """Each run in a fresh process: peak RSS columns; results equal the in-process ones."""
    estimators = ["trace", "dreg:2"]
    out = tmp_path / "cmp"
    res = compare_estimators(estimators, [1], out=out, **SMALL, **TINY)
    memory = ["rss_peak_train_mb", "rss_baseline_mb", "rss_train_increase_mb"]
    _check_outputs(out, estimators, [1], extra=memory)
    for r in res.rows:
        assert r["rss_peak_train_mb"] >= r["rss_baseline_mb"] > 0
    assert "ru_maxrss" in (out / "compare.md").read_text()
    again = compare_estimators(estimators[1:], [1], isolate=False, **SMALL, **TINY)
    assert again.rows[0]["test_elbo"] == res.rows[-1]["test_elbo"]
    assert again.rows[0]["snr_encoder_e2"] == res.rows[-1]["snr_encoder_e2"]


def test_fast_path_column_names_the_implementation_each_row_was_timed_with(tmp_path: Path) -> None:
    """`trace` trains on the fused fast path, `tracegraph` (bit-identical here) on Pyro's ELBO.

    Their s/epoch differ by implementation, so compare.csv and compare.md say which ran: every
    `trace` step after the first (validated Pyro) one is a fast step, and `tracegraph` has none.
    """
    out = tmp_path / "cmp"
    small = dict(SMALL, grad_points=[2], khat_points=0, posterior_points=0)
    res = compare_estimators(["trace", "tracegraph"], [0], out=out, isolate=False, **small, **TINY)
    rows = {r["estimator"]: r for r in _read_csv(out / "compare.csv")}
    assert (rows["trace"]["fast_path"], rows["tracegraph"]["fast_path"]) == ("yes", "no")
    records = {r.estimator: r for r in res.runs}
    # trace: one validated Pyro step, then the fast path for every other step of both epochs
    assert records["trace"].pyro_steps == 1
    assert int(rows["trace"]["fast_path_steps"]) == records["trace"].fast_path_steps >= 3
    assert int(rows["tracegraph"]["fast_path_steps"]) == records["tracegraph"].fast_path_steps == 0
    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| estimator"))
    assert header.rstrip(" |").endswith("fast path")
    assert next(line for line in md.splitlines() if line.startswith("| `trace`")).endswith(" yes |")
    assert next(line for line in md.splitlines() if line.startswith("| `tracegraph`")).endswith(
        " no |"
    )
    assert "Fast path: `yes`" in md


def test_build_like_fit_reproduces_fit_initial_weights(monkeypatch) -> None:
    cfg = FitConfig(**{**TINY, "epochs": 1}, seed=4)
    data = _load_dataset(cfg, 0)
    built: list[str] = []
    real_build = train_module.build_config_vae
    monkeypatch.setattr(
        train_module,
        "build_config_vae",
        lambda *a, **k: (v := real_build(*a, **k), built.append(initial_weights_digest(v)))[0],
    )
    fit(cfg, dataset=data, quiet=True, figures=False)
    recorded = list(built)
    monkeypatch.undo()
    assert recorded == [initial_weights_digest(_build_like_fit(cfg, data))]


# -- command line and example -----------------------------------------------------------------
def _parser() -> Parser:
    parser = Parser(prog="ppl-vae")
    register(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    return parser


TINY_FLAGS = [
    "--max-train", "100", "--hidden-dims", "8", "--latent-dim", "2", "--batch-size", "50",
    "--epochs", "1", "--log-likelihood-samples", "10", "--device", "cpu", "--grad-repeats", "3",
    "--khat-points", "4", "--khat-samples", "20", "--posterior-points", "1",
    "--posterior-draws", "5", "--in-process", "--quiet",
]  # fmt: skip


def test_cli_compare_runs_and_rejects_bad_input(tmp_path: Path, monkeypatch, capsys) -> None:
    parser = _parser()
    out = tmp_path / "cmp"
    args = parser.parse_args(
        ["compare", "--estimators", "trace,iwae:2", "--seeds", "0", "--out", str(out), *TINY_FLAGS]
    )
    assert args.func(args) == 0
    rows = _read_csv(out / "compare.csv")
    assert [r["estimator"] for r in rows] == ["trace", "iwae:2"]
    assert "| `iwae:2` |" in capsys.readouterr().out

    bad = parser.parse_args(["compare", "--estimators", "trace,nope", "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="Unknown estimator 'nope'"):
        bad.func(bad)
    assert not (tmp_path / "x").exists()
    wrong = parser.parse_args(["compare", "--estimator", "trace", "--out", str(tmp_path / "y")])
    with pytest.raises(ConfigError, match="--estimators"):
        wrong.func(wrong)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["compare", "--seeds", "0,a"])
    assert e.value.code == EXIT_USAGE

    # Through the real entry point.
    import ppl_vae.cli as cli

    capsys.readouterr()
    assert cli.main(["compare", "--estimators", "trcae", "--out", str(tmp_path / "z")]) == 2
    assert "Unknown estimator 'trcae'" in capsys.readouterr().err


def test_example_runs_with_smoke_budget(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "compare_example", ROOT / "examples" / "compare_estimators.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "example"
    assert module.main(["--smoke", "--in-process", "--out", str(out)]) == 0
    rows = _read_csv(out / "compare.csv")
    assert {r["estimator"] for r in rows} == {"trace", "iwae:2", "dreg:2"}
    assert (out / "compare.md").is_file()
