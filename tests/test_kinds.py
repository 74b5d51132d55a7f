"""The catalogue of model kinds: every kind trains through the one trainer and resumes exactly.

A new kind is tested by adding one entry to ``KINDS``: how to start a small run of it.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from ppl_vae import fit, fit_ssl
from ppl_vae.training import Callback
from ppl_vae.training.checkpoint import load_checkpoint

USER_MODEL = f"{Path(__file__).resolve().parents[1] / 'examples' / 'own_model.py'}:TwoLayerVAE"
SMALL = {
    "vae": (fit, dict(max_train=200, log_likelihood_samples=4)),
    "m2": (fit_ssl, dict(labels=20, max_train=300, elbo_samples=2)),
    "user": (
        fit,
        dict(model=USER_MODEL, binarize="dynamic", max_train=200, log_likelihood_samples=4),
    ),
}


def _runner(kind):
    fn, small = SMALL[kind]

    def run(resume=False, **kw):
        # a resumed run takes its saved config: only `epochs` may be given
        return fn(**({} if resume else small), resume=resume, **kw)

    return run


KINDS = {kind: _runner(kind) for kind in SMALL}


def _strip(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_interrupted_and_resumed_equals_uninterrupted(kind, tmp_path):
    run = KINDS[kind]
    whole = run(epochs=3, out=tmp_path / "whole", quiet=True, figures=False)
    run(epochs=1, out=tmp_path / "part", quiet=True, figures=False)
    resumed = run(epochs=3, out=tmp_path / "part", resume=True, quiet=True, figures=False)
    assert _strip(resumed.history) == _strip(whole.history)
    a, b = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "part")
    assert a["kind"] == b["kind"] == kind
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    ma, mb = whole.metrics, resumed.metrics
    for key in ("test_elbo", "best_epoch"):
        assert ma[key] == mb[key], key


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def on_train_start(self, trainer) -> None:
        self.calls.append(("start", trainer.start_epoch))

    def on_epoch_end(self, trainer, epoch, row) -> None:
        assert trainer.history[-1] is row
        self.calls.append(("epoch", epoch))

    def on_evaluated(self, trainer, metrics) -> None:
        self.calls.append(("evaluated", "test_elbo" in metrics))

    def on_figures(self, trainer, paths) -> None:
        self.calls.append(("figures", all(p.is_file() for p in paths) and len(paths) > 0))

    def on_train_end(self, trainer) -> None:
        self.calls.append(("end", None))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_callbacks_see_every_epoch_the_metrics_and_the_figures(kind, tmp_path):
    rec = Recorder()
    KINDS[kind](epochs=2, out=tmp_path / "run", quiet=True, callbacks=[rec])
    assert rec.calls == [
        ("start", 0),
        ("epoch", 1),
        ("epoch", 2),
        ("evaluated", True),
        ("figures", True),
        ("end", None),
    ]


class Boom(Callback):
    def __init__(self) -> None:
        self.ended = False

    def on_epoch_end(self, trainer, epoch, row) -> None:
        raise RuntimeError("boom")

    def on_train_end(self, trainer) -> None:
        self.ended = True


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_failing_callback_stops_the_run_and_every_callback_is_closed(kind):
    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        KINDS[kind](epochs=2, quiet=True, figures=False, callbacks=[boom])
    assert boom.ended


def test_the_kl_weight_applied_is_the_schedule_of_beta_and_warm_up():
    """The warm-up factor min(1, t / T) times beta, read from the step the model sees."""
    seen: list[float] = []

    class Spy(Callback):
        def on_train_start(self, trainer) -> None:
            kind = trainer.kind
            inner = kind.loss

            def loss(x):
                seen.append(kind.vae.kl_scale)
                return inner(x)

            kind.loss = loss
            trainer.step_loss = loss

    result = fit(
        epochs=2,
        max_train=256,
        batch_size=128,
        beta=0.5,
        warmup_epochs=1.5,
        log_likelihood_samples=2,
        quiet=True,
        figures=False,
        callbacks=[Spy()],
    )
    steps = math.ceil(result.dataset.train_x.shape[0] / 128)  # 2 steps per epoch
    warmup = 1.5 * steps
    expected = [0.5 * min(1.0, (t + 1) / warmup) for t in range(2 * steps)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert [h["kl_scale"] for h in result.history] == pytest.approx(
        [expected[steps - 1], expected[-1]]
    )


def test_parameters_the_validation_pass_rejects_are_a_training_error(tmp_path):
    """One step per epoch and a huge step size: the loss of the step is finite, but the
    parameters it leaves are not, which the validation pass finds first."""
    from ppl_vae import TrainingError

    with pytest.raises(TrainingError, match=r"non-finite .* at epoch 1, batch 1 of 1"):
        fit(epochs=2, max_train=64, lr=1e30, quiet=True, figures=False, out=tmp_path / "run")


def test_weights_are_never_loaded_into_another_architecture(tmp_path):
    """Same parameter shapes, other activation: the checkpoint's module printout refuses it."""
    from ppl_vae import ConfigError

    run = tmp_path / "run"
    fit(epochs=1, max_train=128, log_likelihood_samples=2, quiet=True, figures=False, out=run,
        encoder_args={"activation": "softplus"})  # fmt: skip
    toml = run / "config.toml"
    text = toml.read_text()
    assert '"activation" = "softplus"' in text
    toml.write_text(text.replace('"activation" = "softplus"', '"activation" = "relu"'))
    with pytest.raises(ConfigError, match=r"another architecture .*Softplus\(.*ReLU\(\)"):
        fit(epochs=2, out=run, resume=True, quiet=True, figures=False)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_lr_schedule_is_applied_per_epoch_and_resumes_exactly(kind, tmp_path):
    run = KINDS[kind]
    sched = dict(lr=1e-3, lr_schedule="StepLR", lr_schedule_args={"step_size": 2, "gamma": 0.5})
    whole = run(epochs=3, out=tmp_path / "whole", quiet=True, figures=False, **sched)
    # the rate each epoch trained with: halved after every second epoch (the schedule's own
    # epoch count must survive the resume: a fresh schedule would keep 1e-3 in epoch 3)
    assert [h["lr"] for h in whole.history] == pytest.approx([1e-3, 1e-3, 5e-4], rel=1e-12)
    run(epochs=1, out=tmp_path / "part", quiet=True, figures=False, **sched)
    resumed = run(epochs=3, out=tmp_path / "part", resume=True, quiet=True, figures=False)
    assert _strip(resumed.history) == _strip(whole.history)


def test_an_unknown_lr_schedule_is_one_line_before_anything_runs(tmp_path):
    from ppl_vae.cli import main

    assert main(["fit", "--lr-schedule", "StepLr", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert not (tmp_path / "r").exists()


# -- every command on every kind ---------------------------------------------------------------
#: kind -> (the command that trains a small run of it, the compare command for two rows of it).
SMALL_FLAGS = ["--max-train", "200", "--hidden-dims", "16", "--latent-dim", "2", "--device", "cpu"]
CLI = {
    "vae": (
        ["fit", *SMALL_FLAGS, "--log-likelihood-samples", "4"],
        ["compare", *SMALL_FLAGS, "--estimators", "trace,meanfield", "--log-likelihood-samples", "4"],
    ),
    "user": (
        ["fit", "--model", USER_MODEL, "--binarize", "dynamic", "--max-train", "200",
         "--log-likelihood-samples", "4", "--device", "cpu"],
        ["compare", "--model", USER_MODEL, "--binarize", "dynamic", "--max-train", "200",
         "--estimators", "trace,iwae:2", "--log-likelihood-samples", "4", "--device", "cpu"],
    ),
    "m2": (
        ["ssl", *SMALL_FLAGS, "--labels", "20", "--elbo-samples", "1"],
        ["compare", "--kind", "m2", *SMALL_FLAGS, "--labels", "20", "--elbo-samples", "1",
         "--label-guides", "enumerate,relaxed"],
    ),
}  # fmt: skip
COMPARE_BUDGET = ["--seeds", "0", "--epochs", "1", "--grad-repeats", "2", "--khat-points", "3",
                  "--posterior-points", "1", "--posterior-draws", "5", "--in-process", "--quiet"]  # fmt: skip


def test_the_cli_catalogue_covers_every_kind():
    assert set(CLI) == set(KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CLI))
def test_every_command_runs_on_the_kind(kind, tmp_path, capsys):
    """Train, evaluate, sample and compare two rows, all from the command line."""
    import csv
    import json

    import numpy as np

    from ppl_vae.cli import main
    from ppl_vae.config import run_kind

    train, compare = CLI[kind]
    run = tmp_path / "run"
    assert main([*train, "--epochs", "2", "--quiet", "--out", str(run)]) == 0
    assert run_kind(run / "config.toml") == kind
    assert main(["evaluate", str(run), "--log-likelihood-samples", "4"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert math.isfinite(evaluation["test_elbo"]) and math.isfinite(
        evaluation["test_log_likelihood"]
    )
    assert main(["sample", str(run), "-n", "3"]) == 0
    samples = np.load(next(run.glob("samples_n3*.npy")))
    assert samples.shape[-1] == 64 and np.isfinite(samples).all()
    out = tmp_path / "compare"
    assert main([*compare, *COMPARE_BUDGET, "--out", str(out)]) == 0
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2, rows
    capsys.readouterr()


def _torchrun(args: list[str], dump: Path) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PPL_VAE_DIST_DUMP=str(dump))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    r = subprocess.run(
        [*launcher, "-m", "ppl_vae.cli", *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CLI))
def test_two_gloo_processes_train_the_kind(kind, tmp_path):
    """Under ``torchrun`` with two gloo processes: both ranks end with the weights the run
    evaluated (best.pt's), and only rank 0 wrote the run."""
    import json

    run, dump = tmp_path / "run", tmp_path / "dump"
    _torchrun([*CLI[kind][0], "--epochs", "2", "--quiet", "--out", str(run)], dump)
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    best = torch.load(run / "best.pt", weights_only=True)["model"]
    assert ranks[0].keys() == ranks[1].keys() == best.keys()
    for k, v in best.items():
        assert torch.equal(ranks[0][k], ranks[1][k]) and torch.equal(ranks[0][k], v), k
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2


def _cli_env() -> dict[str, str]:
    import os

    return dict(os.environ, OMP_NUM_THREADS="1")


def _cli_run(args: list[str]) -> None:
    import sys

    r = subprocess.run([sys.executable, "-m", "ppl_vae.cli", *args], env=_cli_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CLI))
def test_sigkill_mid_run_then_resume_equals_the_uninterrupted_run(kind, tmp_path):
    """SIGKILL a real process of the kind as soon as its first checkpoint exists, resume it,
    and get the uninterrupted run's history and weights bit for bit."""
    import sys
    import time

    train = [*CLI[kind][0], "--epochs", "6", "--quiet"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    _cli_run([*train, "--out", str(whole)])
    p = subprocess.Popen([sys.executable, "-m", "ppl_vae.cli", *train, "--out", str(part)],
                         env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (part / "checkpoint.pt").exists() and p.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    p.kill()
    p.wait(timeout=60)
    assert load_checkpoint(part)["epoch"] < 6, "the run finished before the kill: nothing tested"
    _cli_run([train[0], "--resume", "--out", str(part), "--quiet"])
    a, b = load_checkpoint(whole), load_checkpoint(part)
    assert a["epoch"] == b["epoch"] == 6
    assert _strip(a["history"]) == _strip(b["history"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
