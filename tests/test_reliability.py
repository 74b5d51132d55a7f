"""Faults a user meets (issue 18): each test reproduces one for real and checks the one-line
report, the exit code and that nothing the tool did not write is touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ppl_vae.cli import main

FAST = [
    "--epochs",
    "1",
    "--hidden-dims",
    "8",
    "--latent-dim",
    "2",
    "--log-likelihood-samples",
    "2",
    "--max-train",
    "64",
    "--quiet",
]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "Warning" not in ln and ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_overwrite_refuses_a_directory_the_tool_did_not_write(tmp_path, capsys):
    d = tmp_path / "thesis"
    (d / "figures").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "history.csv").write_text("year,event\n2020,started\n")
    (d / "figures" / "my_thesis_plot.png").write_bytes(b"\x89PNG not really")
    before = snapshot(d)
    assert main(["fit", *FAST, "--out", str(d), "--overwrite"]) == 2
    assert "not a ppl-vae run directory" in one_line_error(capsys)
    assert snapshot(d) == before


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel") / "run"
    assert main(["fit", *FAST, "--out", str(d)]) == 0
    return d


@pytest.fixture
def run_copy(run, tmp_path):
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d


@pytest.mark.parametrize("epochs", [[], ["--epochs", "3"]])
def test_a_failed_resume_leaves_the_run_directory_unchanged(run_copy, epochs, capsys):
    config = run_copy / "config.toml"
    config.write_text(config.read_text().replace("latent_dim = 2", "latent_dim = 4"))
    before = snapshot(run_copy)
    assert main(["fit", "--out", str(run_copy), "--resume", "--quiet", *epochs]) == 2
    assert "checkpoint in" in one_line_error(capsys)
    assert snapshot(run_copy) == before


def test_resume_accepts_options_equal_to_the_saved_config(run_copy, capsys):
    argv = ["fit", *FAST, "--seed", "0", "--out", str(run_copy), "--resume"]
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 0, capsys.readouterr().err
    assert "2 epochs" in capsys.readouterr().out


def test_resume_names_the_option_that_changed(run_copy, capsys):
    before = snapshot(run_copy)
    assert main(["fit", "--seed", "7", "--out", str(run_copy), "--resume", "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "`seed` 0 -> 7" in line, line
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("command", [["fit", *FAST], ["ssl", "--epochs", "1"], ["compare"]])
def test_an_empty_out_is_bad_input(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([*command, "--out", ""])
    assert e.value.code == 2
    assert "--out: expected a directory path, got an empty string" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_an_empty_sample_out_is_bad_input(run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", str(run), "--out", ""])
    assert e.value.code == 2
    assert "empty string" in one_line_error(capsys)


BAD_INIT = """
from ppl_vae.models.priors.gaussian import GaussianPrior


class P(GaussianPrior):
    def __init__(self, latent_dim):
        raise ValueError("scale must be positive")
"""


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (BAD_INIT, "error in user component {path}:P: ValueError: scale must be positive"),
        (
            "import sys\nsys.exit(3)\n",
            "error in user component file '{path}': importing it failed: SystemExit: 3",
        ),
    ],
)
def test_a_failing_user_component_is_one_line(source, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / "my_prior.py"
    path.write_text(source)
    argv = ["fit", *FAST, "--prior", f"{path}:P", "--out", str(tmp_path / "run")]
    monkeypatch.delenv("PPL_VAE_DEBUG", raising=False)
    assert main(argv) == 2
    assert one_line_error(capsys).endswith(message.format(path=path))
    monkeypatch.setenv("PPL_VAE_DEBUG", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "my_prior.py" in err


def test_a_non_finite_epoch_result_is_a_training_error(tmp_path, capsys):
    # lr = 1e18: the one step's loss is finite, the validation ELBO after it is -inf
    out = tmp_path / "run"
    argv = ["fit", *FAST, "--lr", "1e18", "--out", str(out)]
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert "non-finite epoch results {'val_elbo': -inf} at epoch 1" in line, line
    assert not (out / "metrics.json").exists()


def test_a_non_finite_test_metric_is_a_training_error(tmp_path, capsys, monkeypatch):
    from ppl_vae.kinds.vae import VAEKind

    evaluate = VAEKind.evaluate

    def overflowing(self, *args, **kwargs):
        return {**evaluate(self, *args, **kwargs), "test_elbo": float("-inf")}

    monkeypatch.setattr(VAEKind, "evaluate", overflowing)
    out = tmp_path / "run"
    assert main(["fit", *FAST, "--out", str(out)]) == 1
    line = one_line_error(capsys)
    assert "non-finite test metrics {'test_elbo': -inf} after 1 epochs" in line, line
    assert not (out / "metrics.json").exists()


class _System:
    """Unpickling this runs ``os.system`` (were it ever unpickled unsafely)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_holding_code_is_refused_as_such(run_copy, tmp_path, capsys):
    import torch

    marker = tmp_path / "code-ran"
    state = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    state["payload"] = _System(marker)
    torch.save(state, run_copy / "checkpoint.pt")
    assert main(["fit", "--out", str(run_copy), "--resume", "--quiet"]) == 2
    line = one_line_error(capsys)
    assert "holds code or objects that a safe load" in line and "system" in line, line
    assert "truncated or corrupted" not in line and "weights_only=False" not in line, line
    assert "weights_only` set to `False`" not in line, line
    assert not marker.exists()


def test_disk_full_writing_a_checkpoint_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
    import errno
    import json

    import torch

    three = [*FAST, "--max-train", "256", "--batch-size", "64"]
    three[three.index("--epochs") + 1] = "3"
    assert main(["fit", *three, "--out", str(tmp_path / "whole")]) == 0
    save = torch.save

    def full_at_epoch_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"PK\x03\x04 partial")  # what reached the disk before it filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_at_epoch_2)
    assert main(["fit", *three, "--out", str(out)]) == 1
    line = one_line_error(capsys)
    assert "disk full writing checkpoint at epoch 2" in line, line
    assert "the last good checkpoint is epoch 1" in line, line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    monkeypatch.setattr(torch, "save", save)  # space freed
    assert main(["fit", "--out", str(out), "--resume", "--quiet"]) == 0
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((out / "metrics.json").read_text())
    assert a["test_elbo"] == b["test_elbo"] and a["test_log_likelihood"] == b["test_log_likelihood"]
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_out_under_a_file_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    from ppl_vae.training import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("training started"))
    (tmp_path / "notes.txt").write_text("mine\n")
    out = tmp_path / "notes.txt" / "run"
    assert main(["fit", *FAST, "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert f"cannot write the run directory {str(out)!r}: Not a directory" in line, line
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory that cannot be written: a read-only tmpfs (as root) or chmod 555."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    import subprocess

    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(d)]).returncode:
        pytest.skip("root, but cannot mount a read-only tmpfs here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


@pytest.mark.parametrize("sub", ["", "run"])
def test_out_on_a_read_only_location_is_one_line_before_training(
    read_only_dir, sub, capsys, monkeypatch
):
    from ppl_vae.training import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("training started"))
    out = read_only_dir / sub if sub else read_only_dir
    assert main(["fit", *FAST, "--out", str(out)]) == 2
    line = one_line_error(capsys)
    assert f"cannot write the run directory {str(out)!r}: " in line, line
    assert "Read-only file system" in line or "Permission denied" in line, line


def test_a_second_fit_on_the_same_out_refuses(tmp_path):
    """Two real processes: the first holds the lock (it trains); the second refuses at once."""
    import subprocess
    import sys

    out = tmp_path / "run"
    long = [*FAST, "--epochs", "400", "--max-train", "512"]
    cmd = [sys.executable, "-m", "ppl_vae.cli", "fit", *long, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # the first is training
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # even --overwrite (which would replace the first's files under its feet) is refused
        second = subprocess.run(
            [*cmd, "--epochs", "1", "--overwrite"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another ppl-vae process" in lines[0], lines
        assert first.poll() is None  # the first was not disturbed
    finally:
        first.kill()
        first.communicate()
    # The kernel released the killed holder's lock: the run resumes.
    again = [sys.executable, "-m", "ppl_vae.cli", "fit", "--out", str(out), "--resume"]
    third = subprocess.run(
        [*again, "--epochs", "1", "--quiet"], env=env, capture_output=True, text=True, timeout=120
    )
    assert "in use" not in third.stderr, third.stderr


SLOW_START = """
import importlib.abc, sys, time
import ppl_vae.cli

class Slow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ppl_vae.cli.fit":
            print("importing", name, file=sys.stderr, flush=True)
            time.sleep(3)
        return None

sys.meta_path.insert(0, Slow())
sys.exit(ppl_vae.cli.main(sys.argv[1:]))
"""


def test_sigint_while_the_command_starts_is_interrupted(tmp_path):
    """A real SIGINT while ``ppl-vae`` imports its commands (an import made slow by a finder
    that only this test installs, so the signal lands in it every time). The signal is held
    until the imports finish (3 s of sleep here), then answered before any work starts."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_START, "fit", *FAST, "--out", str(tmp_path / "run")],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "importing ppl_vae.cli.fit" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 130
    assert err.strip() == "ppl-vae: interrupted", err
    assert not (tmp_path / "run").exists()


def test_a_failing_figure_never_fails_or_loses_the_run(tmp_path, monkeypatch):
    """The issue's uint8 (N, 2, 8, 8) case made matplotlib raise inside the figures: whatever
    a figure raises, the run ends normally with its checkpoint, history and metrics."""
    import json

    import ppl_vae.figures
    from ppl_vae import fit

    def broken(*args, **kwargs):
        raise TypeError("Invalid shape (8, 8, 2) for image data")

    monkeypatch.setattr(ppl_vae.figures, "write_figures", broken)
    run = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="writing the figures failed"):
        result = fit(epochs=1, max_train=128, log_likelihood_samples=2, quiet=True, out=run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["figures_error"].startswith("TypeError: Invalid shape")
    assert metrics["test_elbo"] == result.metrics["test_elbo"]
    assert (run / "checkpoint.pt").is_file() and (run / "history.csv").is_file()
