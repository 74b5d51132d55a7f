"""Multi-process training: ``torchrun --nproc-per-node 2`` with gloo on the CPU.

Two processes train on shards of every global batch (128 points, as the single-process runs).
Checked: every rank ends with the same parameters, equal to the checkpoint rank 0 wrote (per-rank
dumps through ``PPL_VAE_DIST_DUMP``, see :mod:`ppl_vae.training.distributed`); only rank 0 reports; a
two-process run stopped after 3 epochs and resumed (through the ``ppl-vae`` console script) ends
bit-identical to an uninterrupted one; and the test ELBO matches single-process training.

**Step by step, exactly.** :func:`test_ddp_steps_equal_single_process_steps` runs the real
:class:`~ppl_vae.training.Trainer` under two gloo processes and in one process on a kind whose
loss has no sampling noise (the VAE's decoded posterior mean plus the analytic KL), in float64,
and compares every step's parameters and reported loss. The only difference left is the order of
floating-point sums (two shard sums plus an all-reduce against one sum over the global batch):
relative ~64 eps = 7e-15 per gradient component, which Adam's update passes on as ~lr x 7e-15 =
7e-17 per step (measured: 6e-17 on the parameters, 2e-16 relative on the losses). The tolerance,
1e-12 absolute on the parameters after each of 6 steps and 1e-13 relative on the losses, leaves
a margin of 500-10,000; a rank stepping on its own shard's gradient moves parameters by up to
lr = 1e-2 at the first step (measured: 0.02 on a third of a layer), and a shard loss scaled
wrongly or not all-reduced changes the reported loss by a factor of 2.

Statistical tolerance (end to end, with sampling noise): the two-process test ELBO (seed 0) must
lie within 5 standard deviations of the single-process test ELBOs over ``SEEDS`` seeds on the same
data split (the prediction interval :math:`|x - \\bar{x}| < 5\\, s \\sqrt{1 + 1/k}`); seeds and data
are fixed, so the test is deterministic. The run-to-run spread measured here is about 0.4 nats,
so the interval is about +-3.6 nats: a loose end-to-end check that the two-process run trains at
all; bugs of a few nats are the step-by-step test's to catch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae import build_vae, fit, load_data
from ppl_vae.kinds.base import ModelKind
from ppl_vae.training import Callback, Settings, Trainer
from ppl_vae.training.distributed import Context, DistributedLoss

pytestmark = pytest.mark.slow

EPOCHS = 6
SEEDS = 5
FLAGS = [
    "--hidden-dims",
    "32",
    "--latent-dim",
    "3",
    "--log-likelihood-samples",
    "10",
    "--batch-size",
    "128",
    "--device",
    "cpu",
    "--quiet",
]


def torchrun(
    args: list[str], dump: Path | None = None, console_script: bool = False
) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PPL_VAE_DIST_DUMP", None)
    if dump is not None:
        env["PPL_VAE_DIST_DUMP"] = str(dump)
    # --standalone: a local rendezvous on a free port
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    if console_script:
        script = shutil.which("ppl-vae") or str(Path(sys.executable).with_name("ppl-vae"))
        command = [*launcher, "--no-python", script, *args]
    else:
        command = [*launcher, "-m", "ppl_vae.cli", *args]
    r = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def per_point_elbo(run: Path) -> np.ndarray:
    with open(run / "scores.csv") as f:
        return np.array([float(row["elbo"]) for row in csv.DictReader(f)])


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("ddp")
    run, dump = root / "run", root / "dump"
    r = torchrun(["fit", *FLAGS, "--epochs", str(EPOCHS), "--out", str(run)], dump=dump)
    return run, dump, r.stdout


def test_ranks_end_with_identical_parameters(two_process_run) -> None:
    run, dump, stdout = two_process_run
    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # every rank ends with the best validation epoch's weights, the ones the run evaluated
    state = checkpoint(run)
    written = state["best_model"]
    best_pt = torch.load(run / "best.pt", weights_only=True)
    assert best_pt["epoch"] == state["best_epoch"]
    assert all(torch.equal(best_pt["model"][k], v) for k, v in written.items())
    assert ranks[0].keys() == ranks[1].keys() == written.keys()
    for k in written:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.equal(ranks[0][k], written[k]), k
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == EPOCHS
    assert stdout.count("test ELBO") == 1  # rank 0 reports, rank 1 is silent
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_resumed_two_process_run_equals_the_uninterrupted_one(two_process_run, tmp_path) -> None:
    full, _, _ = two_process_run
    part = tmp_path / "part"
    torchrun(["fit", *FLAGS, "--epochs", "3", "--out", str(part)])
    # Every rank resumes from the checkpoint rank 0 reads; epochs raised from 3, and this
    # time through the console script.
    torchrun(
        ["fit", "--out", str(part), "--resume", "--epochs", str(EPOCHS), "--quiet"],
        console_script=True,
    )
    a, b = checkpoint(full), checkpoint(part)
    assert a["epoch"] == b["epoch"] == EPOCHS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ma = json.loads((full / "metrics.json").read_text())
    mb = json.loads((part / "metrics.json").read_text())
    for key in ("test_elbo", "test_log_likelihood", "final_val_elbo"):
        assert ma[key] == mb[key], key


def test_two_processes_match_single_process_training(two_process_run) -> None:
    run, _, _ = two_process_run
    two = json.loads((run / "metrics.json").read_text())["test_elbo"]
    # Single-process runs with the same global batch size on the same split (seed 0's), over
    # seeds for the initialisation, the batch order and the noise.
    split = load_data("digits", seed=0)
    single, seed0, history0 = [], None, None
    for seed in range(SEEDS):
        r = fit(
            dataset=split,
            epochs=EPOCHS,
            hidden_dims=[32],
            latent_dim=3,
            batch_size=128,
            log_likelihood_samples=10,
            device="cpu",
            seed=seed,
            quiet=True,
        )
        single.append(r.metrics["test_elbo"])
        if seed == 0:
            seed0, history0 = r.test_scores.elbo.numpy(), r.history
    mean, sd = float(np.mean(single)), float(np.std(single, ddof=1))
    bound = 5 * sd * math.sqrt(1 + 1 / SEEDS)
    # Paired per-point difference against the single-process run with the same seed (same
    # initialisation and batch order, different noise streams): reported, not asserted.
    d = per_point_elbo(run) - seed0
    print(
        f"\n2 processes: test ELBO {two:.3f}; 1 process over {SEEDS} seeds: {mean:.3f} +- {sd:.3f} "
        f"(sd); |diff| {abs(two - mean):.3f} < {bound:.3f}; vs the same seed: "
        f"{float(d.mean()):+.3f} +- {float(d.std(ddof=1) / math.sqrt(len(d))):.3f} (paired se)"
    )
    assert abs(two - mean) < bound
    # Same seed: same initialisation and batch order, other noise. The training loss (the sum
    # over all ranks' shards per point) follows the single-process one to about 0.2% here; 2%
    # would still catch a rank training on more or less than its shard (a factor of 2).
    two_history = checkpoint(run)["history"]
    for a, b in zip(two_history, history0, strict=True):
        assert abs(a["train_loss"] / b["train_loss"] - 1) < 0.02, (a, b)


def test_loss_scaling_gives_the_single_process_gradient() -> None:
    """DDP averages over W ranks; W times each shard's loss makes that the global gradient."""
    vae = build_vae((64,), latent_dim=3, hidden_dims=[16])

    def loss(x: torch.Tensor) -> torch.Tensor:  # deterministic: the decoded posterior mean
        return -vae.decode(vae.encode(x).mean).log_prob(x).sum()

    x = torch.bernoulli(torch.rand(7, 64))
    world = 3
    wrapped = DistributedLoss(vae, loss, world)
    grads: list[torch.Tensor] = []
    for shard in torch.arange(7).tensor_split(world):
        vae.zero_grad()
        wrapped(x[shard]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    vae.zero_grad()
    loss(x).backward()
    single = torch.cat([p.grad.flatten() for p in vae.parameters()])
    torch.testing.assert_close(torch.stack(grads).mean(0), single, rtol=1e-5, atol=1e-5)
    vae.zero_grad()
    wrapped(x[:0]).backward()  # an empty shard: zero, with a zero gradient for every parameter
    assert all(p.grad is not None and not p.grad.any() for p in vae.parameters())


# --------------------------------------------------------------------------- step by step

DDP_STEPS = 6
DDP_BATCH = 64


class DeterministicKind(ModelKind):
    """A kind whose loss has no sampling noise: the VAE's decoded posterior mean + analytic KL.

    .. math:: J(x) = \\sum_i -\\log p(x_i \\mid \\mathrm{dec}(\\mu_q(x_i)))
        + \\mathrm{KL}(q(z \\mid x_i) \\,\\|\\, p(z))

    One step per epoch, global batches of ``DDP_BATCH`` points drawn from :attr:`shuffle`.
    """

    name = "deterministic"
    monitor = "val_loss"

    def __init__(self, vae, x: torch.Tensor) -> None:
        super().__init__(vae, seed=0)
        self.vae, self.x = vae, x
        self._order = torch.arange(len(x))

    def steps_per_epoch(self) -> int:
        return 1

    def start_epoch(self, epoch: int, device: torch.device) -> None:
        self._order = torch.randperm(len(self.x), generator=self.shuffle)

    def batch(self, b: int, shard) -> tuple[torch.Tensor]:
        return (self.x[shard(self._order[:DDP_BATCH])],)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        q = self.vae.encode(x)
        recon = -self.vae.decode(q.mean).log_prob(x).sum()
        return recon + torch.distributions.kl_divergence(q, self.vae.prior()).sum()

    def train_columns(self, sums: torch.Tensor, steps: int) -> dict[str, float]:
        return {"loss": float(sums[0]) / steps}

    def validate(self) -> dict[str, float]:
        with torch.no_grad():
            return {"val_loss": -float(self.loss(self.x[:16]))}

    def evaluate(self, history, train_seconds: float) -> dict:
        return {}


class _Record(Callback):
    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []

    def on_epoch_end(self, trainer, epoch: int, row: dict[str, float]) -> None:
        self.params.append({k: v.detach().clone() for k, v in trainer.module.state_dict().items()})


def _deterministic_run(ctx: Context) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    import pyro

    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        vae = build_vae((64,), latent_dim=3, hidden_dims=[16], likelihood="bernoulli").double()
        x = torch.bernoulli(load_data("digits", seed=0).train_x[:256].double(),
                            generator=torch.Generator().manual_seed(0))  # fmt: skip
        record = _Record()
        trainer = Trainer(DeterministicKind(vae, x), Settings(epochs=DDP_STEPS, lr=1e-2, seed=0),
                          ctx=ctx, callbacks=[record], quiet=True)  # fmt: skip
        history = trainer.fit()
    return record.params, [h["loss"] for h in history]


def _ddp_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as tdist

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        params, losses = _deterministic_run(Context(rank=rank, world_size=2))
        torch.save({"params": params, "losses": losses}, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_ddp_steps_equal_single_process_steps(tmp_path) -> None:
    """Two gloo ranks through the real trainer equal one process, step by step (module
    docstring: float64, 1e-12 on parameters, 1e-13 relative on the losses)."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    single_params, single_losses = _deterministic_run(Context())
    assert len(single_params) == DDP_STEPS
    for r in ranks:
        for step, (a, b) in enumerate(zip(r["params"], single_params, strict=True)):
            for k in b:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12,
                                           msg=lambda m, k=k, s=step: f"step {s + 1}, {k}: {m}")  # fmt: skip
        assert r["losses"] == pytest.approx(single_losses, rel=1e-13)
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):  # ranks agree exactly
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the parameters do move: each step changes them by far more than the tolerance
    first, last = single_params[0], single_params[-1]
    assert max(float((first[k] - last[k]).abs().max()) for k in first) > 1e-3
