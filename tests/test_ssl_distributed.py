"""``ppl-vae ssl`` under ``torchrun --nproc-per-node 2`` with gloo on the CPU.

Two processes train the M2 model on shards of every global labelled and unlabelled batch (see
:func:`ppl_vae.ssl.fit_ssl` and :mod:`ppl_vae.training.distributed`). Checked, all exactly (no
statistical tolerance: every comparison is bit-for-bit equality of tensors or a count):

- both ranks end with the same parameters (per-rank dumps through ``PPL_VAE_DIST_DUMP``), equal
  to the best-validation weights rank 0 wrote into ``checkpoint.pt`` and ``best.pt``;
- rank 0 alone reports and writes: one report line on stdout, ``metrics.json`` with the test
  accuracy (equal to that of the run's best weights reopened from the directory), the number of
  processes and the supervised baseline (trained on rank 0 only; its accuracy consistent with its
  per-class accuracies), one ``history.csv`` row per epoch, no temporary files left;
- the two-process per-epoch training losses (total, labelled, unlabelled, classification) are
  within 1 % (relative) of a single-process run with the same seed. Same seed means the same
  initial weights, global batches and labelled subset; only the sampling noise differs (each rank
  draws its own). Measured gap: about 0.01 % on the total and 0.1 % on the classification loss,
  against about 1 % between seeds, so 1 % is far from flaky, while a shard loss scaled by its own
  size instead of the global batch's would report twice the loss;
- a two-process run stopped after 1 epoch and resumed to 2 ends with the parameters, history
  losses and test metrics of the uninterrupted two-process run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppl_vae.runs.reopen import load_run
from ppl_vae.ssl import fit_ssl

pytestmark = pytest.mark.slow

EPOCHS = 2
FLAGS = [
    "--labels",
    "20",
    "--hidden-dims",
    "16",
    "--latent-dim",
    "2",
    "--device",
    "cpu",
    "--quiet",
]


def torchrun(args: list[str], dump: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PPL_VAE_DIST_DUMP", None)
    if dump is not None:
        env["PPL_VAE_DIST_DUMP"] = str(dump)
    # --standalone: a local rendezvous on a free port
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ppl_vae.cli",
        "ssl",
        *args,
    ]
    r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("ssl_ddp")
    run, dump = root / "run", root / "dump"
    r = torchrun(
        [*FLAGS, "--epochs", str(EPOCHS), "--baseline", "supervised", "--out", str(run)],
        dump=dump,
    )
    return run, dump, r.stdout


def test_ranks_end_with_identical_parameters(two_process_run) -> None:
    run, dump, _ = two_process_run
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    state = load(run / "checkpoint.pt")
    best = state["best_model"]
    assert ranks[0].keys() == ranks[1].keys() == best.keys()
    for k in best:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.equal(ranks[0][k], best[k].cpu()), k
    assert state["epoch"] == EPOCHS
    best_pt = load(run / "best.pt")
    assert best_pt["best_epoch"] == state["best_epoch"]
    for k in best:
        assert torch.equal(best_pt["best_model"][k], best[k]), k


def test_rank_zero_alone_reports_and_writes(two_process_run) -> None:
    run, _, stdout = two_process_run
    assert stdout.count("test accuracy") == 1  # rank 0 reports, rank 1 is silent
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == EPOCHS
    # The reported accuracies are those of the weights rank 0 wrote, on the run's test split:
    # reopened from the run directory, the best-validation model predicts the same labels.
    run_ = load_run(run, device="cpu")
    y = run_.dataset.test_y
    acc = float((run_.model.predict(run_.test_x) == y).double().mean())
    # the same predictions, so equal up to the float32 mean's rounding (one point is 1/359)
    assert metrics["test_accuracy"] == pytest.approx(acc, abs=1e-6)
    confusion = torch.tensor(metrics["confusion_matrix"])
    assert int(confusion.sum()) == len(y) and int(confusion.trace()) == round(acc * len(y))
    assert math.isfinite(metrics["test_elbo"])
    # the baseline's overall accuracy is its per-class accuracies weighted by the class counts
    counts = torch.bincount(y.cpu(), minlength=confusion.shape[0]).double()
    per_class = torch.tensor([metrics["baseline_per_class_accuracy"][k] for k in
                              metrics["per_class_accuracy"]], dtype=torch.float64)  # fmt: skip
    overall = float((per_class * counts).sum() / counts.sum())
    assert metrics["baseline_test_accuracy"] == pytest.approx(overall, abs=1e-6)
    rows = history(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss", "unlabelled_loss"))
    assert (run / "baseline_history.csv").is_file()
    assert not [p.name for p in run.rglob("*") if ".tmp" in p.name]


def test_losses_match_single_process_training(two_process_run) -> None:
    run, _, _ = two_process_run
    single = fit_ssl(
        labels=20,
        epochs=EPOCHS,
        hidden_dims=[16],
        latent_dim=2,
        device="cpu",
        quiet=True,
        figures=False,
    )
    keys = ("loss", "labelled_loss", "unlabelled_loss", "class_loss")
    for r2, r1 in zip(history(run), single.history, strict=True):
        for key in keys:
            assert float(r2[key]) == pytest.approx(r1[key], rel=0.01), (r2["epoch"], key)


def test_resumed_two_process_run_equals_the_uninterrupted_one(two_process_run, tmp_path) -> None:
    full, _, _ = two_process_run
    part = tmp_path / "part"
    torchrun([*FLAGS, "--epochs", "1", "--baseline", "supervised", "--out", str(part)])
    # Every rank resumes from the checkpoint rank 0 reads; epochs raised from 1.
    torchrun(["--out", str(part), "--resume", "--epochs", str(EPOCHS), "--quiet"])
    a, b = load(full / "checkpoint.pt"), load(part / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    for name in ("model", "best_model"):
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    ha, hb = history(full), history(part)
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("loss", "labelled_loss", "unlabelled_loss", "class_loss", "val_accuracy"):
            assert ra[key] == rb[key], key
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((part / "metrics.json").read_text())
    for key in ("test_accuracy", "test_elbo", "best_epoch", "baseline_test_accuracy"):
        assert ma[key] == mb[key], key
