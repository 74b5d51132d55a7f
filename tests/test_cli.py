"""The command line: fit / evaluate / sample, reproducing a run from its config, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest

from ppl_vae.cli import main

FAST = [
    "--epochs",
    "2",
    "--hidden-dims",
    "32",
    "--latent-dim",
    "3",
    "--log-likelihood-samples",
    "10",
    "--quiet",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["fit", *FAST, "--out", str(d)]) == 0
    return d


def test_fit_writes_a_run(run_dir, capsys):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["log_likelihood_samples"] == 10
    assert (run_dir / "figures" / "samples.png").is_file()


def test_config_reproduces_the_run(run_dir, tmp_path):
    out = tmp_path / "again"
    assert (
        main(["fit", "--config", str(run_dir / "config.toml"), "--out", str(out), "--quiet"]) == 0
    )
    a = json.loads((run_dir / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["test_elbo"] == b["test_elbo"] and a["test_log_likelihood"] == b["test_log_likelihood"]
    assert (run_dir / "history.csv").read_text().split("\n")[0] == (
        out / "history.csv"
    ).read_text().split("\n")[0]


def test_evaluate_and_sample(run_dir, tmp_path, capsys):
    assert main(["evaluate", str(run_dir), "--log-likelihood-samples", "15"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["log_likelihood_samples"] == 15
    # The reopened run scores the same weights on the same test points as fit did; only the z
    # draws differ. The test ELBO (a mean over 359 points x K draws) then moves by ~0.01 nats
    # between draws (measured), so 0.1 nats is ~10 sd; log p(x) with K = 15 lies between the
    # K = 10 estimate and that plus its gap to the ELBO (E log p_K rises with K and stays below
    # log p(x)), give or take the same 0.1.
    m = json.loads((run_dir / "metrics.json").read_text())
    assert abs(out["test_elbo"] - m["test_elbo"]) < 0.1
    gap = m["test_log_likelihood"] - m["test_elbo"]
    assert m["test_log_likelihood"] - 0.1 < out["test_log_likelihood"]
    assert out["test_log_likelihood"] < m["test_log_likelihood"] + gap + 0.1
    assert out["test_log_likelihood"] >= out["test_elbo"]  # Jensen, next to the checks above
    assert (run_dir / "evaluation.json").is_file()
    target = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "-n", "8", "--out", str(target)]) == 0
    assert np.load(target).shape == (8, 64)
    assert target.with_suffix(".png").is_file()
    mean = np.load(target)
    assert (
        main(["sample", str(run_dir), "-n", "8", "--out", str(target), "--draw", "--overwrite"])
        == 0
    )
    drawn = np.load(target)
    assert set(np.unique(drawn)) <= {0.0, 1.0} and not set(np.unique(mean)) <= {0.0, 1.0}


def test_prior_and_likelihood_options(tmp_path):
    out = tmp_path / "r"
    args = [
        "fit",
        *FAST,
        "--out",
        str(out),
        "--likelihood",
        "normal",
        "--likelihood-arg",
        "scale=per-element",
        "--prior-arg",
        "learn_scale=true",
        "--estimator",
        "meanfield",
        "--warmup-epochs",
        "1",
        "--hidden-dims",
        "",
        "--figure-draws",
    ]
    assert main(args) == 0
    cfg = (out / "config.toml").read_text()
    assert 'likelihood_args = { "scale" = "per-element" }' in cfg
    assert "hidden_dims = []" in cfg
    assert "figure_draws = true" in cfg and (out / "figures" / "samples.png").is_file()


def run_cli(argv: list[str]) -> int:
    """``main(argv)``'s exit code, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--prior", "gausian"], "Unknown prior 'gausian'; expected one of"),
        (["fit", "--likelihood", "bernouli"], "Unknown likelihood 'bernouli'"),
        (["fit", "--estimator", "trcae"], "Unknown estimator 'trcae'; expected one of"),
        (["fit", "--epochs", "0"], "`epochs` must be positive, got 0"),
        (["fit", "--epochs", "three"], "invalid int value: 'three'"),
        (["fit", "--hidden-dims", "64,x"], "comma-separated list of integers"),
        (["fit", "--data", "nope.npy"], "nope.npy"),
        (["fit", "--prior-arg", "concentration"], "--prior-arg expects KEY=VALUE"),
        (["fit", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["fit", "--config", "missing.toml"], "config file 'missing.toml' does not exist"),
        (["evaluate", "no/such/run"], "run directory 'no/such/run' does not exist"),
        (["sample", "no/such/run"], "does not exist"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = run_cli([*argv, "--quiet"] if argv[0] == "fit" else argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_existing_out_is_refused_and_untouched(run_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert main(["fit", *FAST, "--out", str(run_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_corrupted_checkpoints_are_reported(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["fit", *FAST, "--out", str(out)]) == 0
    (out / "best.pt").write_bytes(b"\x00garbage")  # the weights evaluate reads
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and len(err.strip().splitlines()) == 1
    (out / "best.pt").unlink()  # then the checkpoint's copy of the best weights
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (out / name).write_bytes(b"\x00garbage")
    assert main(["evaluate", str(out)]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and len(err.strip().splitlines()) == 1


def test_resume_continues_a_run(tmp_path):
    out = tmp_path / "r"
    assert main(["fit", *FAST, "--out", str(out)]) == 0
    assert main(["fit", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 3
    assert len((out / "history.csv").read_text().strip().splitlines()) == 4


def test_help_and_console_script():
    for sub in ([], ["fit"], ["evaluate"], ["sample"]):
        with pytest.raises(SystemExit) as e:
            main([*sub, "--help"])
        assert e.value.code == 0
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("ppl-vae") == "ppl_vae.cli:main"
    r = subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "ppl-vae" in r.stdout
