"""``ppl-vae compare`` on the M2 kind: rows of (estimator, label guide), one split, equal weights.

One comparison of three rows (``auto`` with each shipped label guide) on digits, run once through
the real CLI entry point, serves the tests below; each checks it against something computed
apart from it (``fit_ssl`` itself, the weights the trainer really started from, the model's own
modules).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch

import ppl_vae.cli as cli
from ppl_vae.config import SSLConfig
from ppl_vae.runs.compare import weights_digest
from ppl_vae.runs.compare_m2 import m2_groups, parse_rows
from ppl_vae.ssl import build_ssvae, fit_ssl
from ppl_vae.training.callbacks import CallbackList

# A tiny M2 run on digits: a row trains and evaluates in about a second.
TINY = dict(
    labels=20,
    max_train=256,
    epochs=2,
    batch_size=64,
    latent_dim=2,
    hidden_dims=[16],
    elbo_samples=1,
    device="cpu",
)
TINY_FLAGS = [
    "--labels", "20", "--max-train", "256", "--epochs", "2", "--batch-size", "64",
    "--latent-dim", "2", "--hidden-dims", "16", "--elbo-samples", "1", "--device", "cpu",
    "--grad-repeats", "3", "--grad-batch-size", "20", "--khat-points", "4",
    "--khat-samples", "10", "--posterior-points", "1", "--posterior-draws", "5",
    "--in-process", "--quiet",
]  # fmt: skip
GUIDES = ["enumerate", "relaxed", "sample"]
OWN_ESTIMATOR = {"enumerate": "enum", "relaxed": "trace", "sample": "tracegraph"}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``ppl-vae compare --kind m2 --label-guides enumerate,relaxed,sample`` (estimator ``auto``),
    recording the full state every run's trainer started from (after every callback's
    ``on_train_start``, so after compare aligned the shared weights)."""
    out = tmp_path_factory.mktemp("m2") / "cmp"
    started: list[dict[str, torch.Tensor]] = []
    real = CallbackList.on_train_start

    def recording(self: CallbackList, trainer: Any) -> None:
        real(self, trainer)
        started.append({k: v.detach().clone() for k, v in trainer.module.state_dict().items()})

    argv = ["compare", "--kind", "m2", "--label-guides", ",".join(GUIDES), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp, pyro.validation_enabled(True):
        mp.setattr(CallbackList, "on_train_start", recording)
        pyro.set_rng_seed(0)
        assert cli.main([*argv, *TINY_FLAGS]) == 0
    return {"out": out, "rows": _read_csv(out / "compare.csv"), "started": started}


def test_cli_compares_label_guides_with_an_accuracy_column(comparison: dict[str, Any]) -> None:
    out, rows = comparison["out"], comparison["rows"]
    assert [(r["estimator"], r["label_guide"], r["seed"]) for r in rows] == [
        (OWN_ESTIMATOR[g], g, "0") for g in GUIDES
    ]
    for r in rows:
        assert r["status"] == "ok"
        for c in ("test_accuracy", "test_elbo", "test_log_likelihood", "best_val_accuracy"):
            assert math.isfinite(float(r[c])), (r["label_guide"], c, r[c])
        # the row reports its own run's evaluation (metrics.json; the CSV keeps 6 digits)
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert metrics["label_guide"] == r["label_guide"]
        for c in ("test_accuracy", "test_elbo", "test_log_likelihood"):
            assert float(r[c]) == pytest.approx(metrics[c], rel=1e-5), (r["label_guide"], c)
    # 10 classes: chance is 0.1, and 2 epochs on 20 labels already beat it on every row
    assert all(float(r["test_accuracy"]) > 0.11 for r in rows)
    md = (out / "compare.md").read_text()
    assert "| estimator | label guide | K | seeds | test accuracy | test ELBO |" in md
    for g in GUIDES:
        assert f"| `{OWN_ESTIMATOR[g]}` | `{g}` |" in md
    for name in ("accuracy_vs_time.png", "khat.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    assert len(_read_csv(out / "khat.csv")) == 4 * len(GUIDES)
    curves = _read_csv(out / "curves.csv")
    assert [(c["label_guide"], c["epoch"]) for c in curves] == [
        (g, e) for g in GUIDES for e in ("1", "2")
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # arviz's once-a-day refactor notice
        import arviz as az
    post = az.from_netcdf(str(Path(rows[0]["run_dir"]) / "posterior.nc"))
    assert post.posterior["y"].shape == (1, 5, 1, 10)  # chain, draw, test point, one-hot class
    assert post.posterior["z"].shape == (1, 5, 1, 2)
    assert post.attrs["label_guide"] == "enumerate"


def test_fast_path_column_says_which_rows_trained_on_the_m2_fast_path(
    comparison: dict[str, Any],
) -> None:
    """`enumerate` (enum) and `relaxed` (trace) train on ppl_vae/inference/m2_fastpath.py after
    the first, validated Pyro step; `sample` (tracegraph) only partly: its unlabelled term has
    a score-function estimator, which runs Pyro's TraceGraph_ELBO at every step. Seconds per
    epoch of the rows differ by implementation as well: the CSV and the table say which ran."""
    rows = {r["label_guide"]: r for r in comparison["rows"]}
    assert {g: rows[g]["fast_path"] for g in GUIDES} == {
        "enumerate": "yes",
        "relaxed": "yes",
        "sample": "partly",
    }
    assert (
        int(rows["enumerate"]["fast_path_steps"]) > 0
        and int(rows["relaxed"]["fast_path_steps"]) > 0
    )
    assert int(rows["sample"]["pyro_steps"]) >= 4  # the unlabelled term of every step
    md = (comparison["out"] / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| estimator"))
    assert header.rstrip(" |").endswith("fast path")
    assert "ppl_vae/inference/m2_fastpath.py" in md


def test_rows_start_from_bitwise_equal_weights(comparison: dict[str, Any]) -> None:
    """Every weight the rows share is bit-identical where the trainers started, although the
    ``sample`` guide's own build draws other encoder and decoder weights (its baseline network
    comes first); ``init_digest`` is the hash of exactly those shared weights."""
    rows, started = comparison["rows"], comparison["started"]
    assert len(started) == len(rows)
    shared = [k for k in started[0] if all(k in s for s in started)]
    assert any(k.startswith("encoder.") for k in shared)
    assert any(k.startswith("label_guide.net.") for k in shared)
    for s in started[1:]:
        unequal = [k for k in shared if not torch.equal(s[k], started[0][k])]
        assert not unequal, unequal
    assert {r["init_digest"] for r in rows} == {weights_digest({k: started[0][k] for k in shared})}
    assert [r["init_from_reference"] for r in rows] == ["False", "False", "True"]
    # what the sample guide's own build would have started from: other encoder weights
    with pyro.settings.context(module_local_params=True):
        own = {}
        for g in ("enumerate", "sample"):
            pyro.set_rng_seed(0)
            own[g] = build_ssvae((64,), 10, label_guide=g, latent_dim=2, hidden_dims=[16])
    name = next(k for k in shared if k.startswith("encoder.") and k.endswith("weight"))
    assert not torch.equal(own["sample"].state_dict()[name], own["enumerate"].state_dict()[name])


@pytest.mark.parametrize("guide", ["enumerate", "relaxed"])
def test_a_row_equals_fit_ssl_for_the_same_config_and_seed(
    comparison: dict[str, Any], guide: str
) -> None:
    """``fit_ssl`` alone (no gradient probe, the config written here, not compare's) gives the
    row's numbers exactly: training is deterministic on the CPU, the probe leaves the trajectory
    unchanged and compare hands the row its own label guide, seed and split."""
    row = next(r for r in comparison["rows"] if r["label_guide"] == guide)
    result = fit_ssl(SSLConfig(**TINY, label_guide=guide, seed=0), quiet=True, figures=False)
    mine = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
    for key in ("test_accuracy", "test_elbo", "test_log_likelihood", "best_val_accuracy"):
        assert mine[key] == result.metrics[key], key
        assert float(row[key]) == pytest.approx(result.metrics[key], rel=1e-5), key
    assert mine["per_class_accuracy"] == result.metrics["per_class_accuracy"]


def test_gradient_groups_include_the_classifier(comparison: dict[str, Any]) -> None:
    rows = comparison["rows"]
    for r in rows:
        for e in (1, 2):
            for group in ("encoder", "decoder", "classifier"):
                assert float(r[f"grad_var_{group}_e{e}"]) > 0, (r["label_guide"], group, e)
                assert math.isfinite(float(r[f"snr_{group}_e{e}"])), (r["label_guide"], group)
        has_baseline = r["label_guide"] == "sample"
        assert (r["grad_var_baseline_e2"] != "") == has_baseline, r["label_guide"]
    # Score-function gradients of q(y|x) against an exact sum over y: the classifier's gradient
    # variance differs by orders of magnitude (measured: ~5e5x), far above run-to-run noise.
    var = {r["label_guide"]: float(r["grad_var_classifier_e2"]) for r in rows}
    assert var["sample"] > 100 * var["enumerate"], var


def test_m2_groups_are_the_model_networks() -> None:
    with pyro.settings.context(module_local_params=True):
        model = build_ssvae((64,), 10, label_guide="sample", latent_dim=2, hidden_dims=[16])
    groups = m2_groups(model)
    ids = {g: {id(p) for p in ps} for g, ps in groups.items()}
    assert ids == {
        "encoder": {id(p) for p in model.encoder.parameters()},
        "decoder": {id(p) for p in model.decoder.parameters()},
        "classifier": {id(p) for p in model.label_guide.net.parameters()},
        "baseline": {id(p) for p in model.label_guide.baseline.parameters()},
    }


def test_rows_are_the_product_of_estimators_and_guides_or_explicit_pairs() -> None:
    assert parse_rows("auto,iwae:2", "relaxed,sample", "enumerate") == [
        ("auto", "relaxed"), ("auto", "sample"), ("iwae:2", "relaxed"), ("iwae:2", "sample"),
    ]  # fmt: skip
    assert parse_rows("enum@enumerate,TRACE@relaxed", None, "sample") == [
        ("enum", "enumerate"),
        ("trace", "relaxed"),
    ]
    assert parse_rows(None, None, "relaxed") == [("auto", "relaxed")]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kind", "m2", "--label-guides", "enumerate,nope"], "Unknown label_guide 'nope'"),
        (
            ["--kind", "m2", "--estimators", "trace", "--label-guides", "enumerate"],
            "estimator 'trace' cannot train label guide 'enumerate'",
        ),
        (["--kind", "m2", "--estimators", "meanfield@sample"], "must be fully reparameterized"),
        (["--kind", "m2", "--beta", "2"], "--beta applies to ppl-vae fit's kinds"),
        (  # TINY_FLAGS hold two more M2 flags
            ["--label-guides", "relaxed"],
            "--label-guides, --elbo-samples, --labels apply to --kind m2 only",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, flags, message
) -> None:
    monkeypatch.setattr("ppl_vae.ssl.fit_ssl", lambda *a, **k: pytest.fail("fit_ssl was called"))
    out = tmp_path / "cmp"
    assert cli.main(["compare", *flags, *TINY_FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ppl-vae compare: error: "), err
    assert message in err
    assert not out.exists()


def test_an_ssl_run_config_selects_the_m2_kind(comparison: dict[str, Any], tmp_path: Path) -> None:
    """``--config`` of a run that records kind m2 compares M2 rows without ``--kind``, from that
    run's options (20 labels, latent 2), and ``--kind vae`` against it is refused."""
    config = Path(comparison["rows"][0]["run_dir"]) / "config.toml"
    assert 'kind = "m2"' in config.read_text()
    out = tmp_path / "again"
    flags = ["--epochs", "1", "--khat-points", "0", "--posterior-points", "0", "--in-process"]
    argv = ["compare", "--config", str(config), "--estimators", "trace@relaxed", *flags]
    assert cli.main([*argv, "--quiet", "--grad-repeats", "2", "--out", str(out)]) == 0
    (row,) = _read_csv(out / "compare.csv")
    assert (row["estimator"], row["label_guide"]) == ("trace", "relaxed")
    saved = SSLConfig.load(Path(row["run_dir"]) / "config.toml")
    assert (saved.labels, saved.latent_dim, saved.estimator, saved.epochs) == (20, 2, "trace", 1)
    assert cli.main(["compare", "--kind", "vae", "--config", str(config)]) == 2
