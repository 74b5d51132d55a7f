"""Kill anywhere, resume exactly: SIGKILL ``ppl-vae fit`` at random moments, then ``--resume``.

The children run ``ppl_vae.cli.main(["fit", ...])`` exactly as ``python -m ppl_vae.cli fit``
does, but are forked from a small wrapper process (the "zygote" below, test code only) that has
imported torch, Pyro, scikit-learn and matplotlib once: a fresh interpreter costs 5-15 s of
imports on the shared test machine, a fork a few milliseconds, which is what makes dozens of
kills affordable. The wrapper also widens the windows worth hitting: ``torch.save`` writes half
of the checkpoint, sleeps, then writes the rest, and ``os.replace`` (every atomic rename of a
checkpoint, ``config.toml``, ``history.csv``, ``metrics.json``, ``scores.csv``) sleeps before
and after renaming. Every child appends what it is doing to a log, so the test kills at a
chosen moment (the n-th time a step, a checkpoint write, a rename or the final evaluation
starts, plus a random delay) and knows where the kill landed.

After each kill the run directory is continued with ``--resume`` when it has a ``config.toml``
and started again otherwise; when a run finishes, its final checkpoint (model and optimiser
tensors, ``torch.equal``), ``metrics.json`` (all but the wall-clock ``train_seconds``),
``scores.csv`` and history must equal those of an uninterrupted run, and no temporary file may
be left. Kills continue over as many runs as it takes to land at least 20.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

FLAGS = [
    "--epochs",
    "6",
    "--hidden-dims",
    "32",
    "--latent-dim",
    "3",
    "--log-likelihood-samples",
    "10",
    "--device",
    "cpu",
    "--quiet",
]
MIN_KILLS = 30
SLOW = 0.04  # seconds each checkpoint write and each rename is held open

ZYGOTE = r'''
"""Test-only wrapper: forks children that run ppl_vae.cli.main(argv) with slow, logged writes."""
import io, json, os, sys, time, traceback

import torch
torch.set_num_threads(1)
import torch._dynamo  # noqa: F401  (imported by the first torch.optim.Adam otherwise)
import matplotlib.figure  # noqa: F401
import sklearn.datasets  # noqa: F401
import ppl_vae.cli, ppl_vae.figures, ppl_vae.train  # noqa: E401


def child(argv, log, stdout, stderr, slow):
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def mark(what):
        os.write(fd, (what + "\n").encode())

    real_save, real_replace = torch.save, os.replace

    def slow_save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        mark("save-begin")
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(slow)
        f.write(data[len(data) // 2 :])
        mark("save-end")

    def slow_replace(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst))
        mark("rename-begin:" + name)
        time.sleep(slow)
        real_replace(src, dst, *args, **kwargs)
        mark("rename-end:" + name)
        time.sleep(slow)

    def logged(name, fn):
        def wrapper(*args, **kwargs):
            mark(name)
            return fn(*args, **kwargs)
        return wrapper

    torch.save, os.replace = slow_save, slow_replace
    torch.optim.Adam.step = logged("step", torch.optim.Adam.step)
    ppl_vae.kinds.batched.mean_elbo = logged("validate", ppl_vae.kinds.batched.mean_elbo)
    ppl_vae.kinds.batched.score = logged("evaluate", ppl_vae.kinds.batched.score)
    ppl_vae.figures.write_figures = logged("figures", ppl_vae.figures.write_figures)
    mark("main")
    sys.argv = ["ppl-vae", *argv]
    code = ppl_vae.cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    mark("exit")
    return code


for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = child(**request)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class Zygote:
    """The wrapper process: ``run(argv, kill_at)`` forks one CLI child and maybe kills it."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        script = workdir / "zygote.py"
        script.write_text(ZYGOTE)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
        self.proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        self.count = 0

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(
        self, argv: list[str], kill_at: tuple[str, int, float] | None = None
    ) -> tuple[int, list[str], str]:
        """Run ``ppl-vae`` with ``argv``; with ``kill_at=(mark, n, delay)``, SIGKILL it ``delay``
        seconds after its n-th log line starting with ``mark``. Returns (exit code, log, stderr);
        exit code -9 means killed."""
        self.count += 1
        log = self.dir / f"child{self.count}.log"
        err = self.dir / f"child{self.count}.err"
        request = dict(
            argv=argv,
            log=str(log),
            stdout=str(self.dir / f"child{self.count}.out"),
            stderr=str(err),
            slow=SLOW,
        )
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = self._reply()["pid"]
        if kill_at is not None:
            mark, n, delay = kill_at
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                lines = log.read_text().splitlines() if log.exists() else []
                if sum(line.startswith(mark) for line in lines) >= n:
                    time.sleep(delay)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    break
                if lines and lines[-1] == "exit":
                    break
                time.sleep(0.002)
        code = self._reply()["code"]
        return code, log.read_text().splitlines() if log.exists() else [], err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def where(log: list[str]) -> str:
    """The phase a kill landed in, from the child's last log line."""
    last = log[-1] if log else ""
    if "evaluate" in log or "figures" in log:
        return "final evaluation and its writes"
    if last == "save-begin" or last.startswith(
        ("rename-begin:checkpoint", "rename-end:checkpoint")
    ):
        return "checkpoint write"
    if last.startswith(("rename-", "save-end")):
        return "config/history write"
    if last in ("step", "validate"):
        return "training"
    return "startup"


def choose_kill(rng: random.Random, fresh: bool) -> tuple[str, int, float]:
    """A random moment: a phase, which occurrence of it and a delay inside it."""
    kind = rng.choice(
        ["startup", "training", "checkpoint", "checkpoint", "write", "evaluation", "evaluation"]
    )
    if kind == "startup":
        return "main", 1, rng.uniform(0.0, 0.25)
    if kind == "training":
        return "step", rng.randint(1, 30), rng.uniform(0.0, 0.01)
    if kind == "checkpoint":
        mark = rng.choice(
            ["save-begin", "rename-begin:checkpoint.prev.pt", "rename-begin:checkpoint.pt"]
        )
        return mark, rng.randint(1, 3), rng.uniform(0.0, 2 * SLOW)
    if kind == "write":
        names = ["history.csv"] + (["config.toml"] if fresh else [])
        return "rename-begin:" + rng.choice(names), rng.randint(1, 2), rng.uniform(0.0, 2 * SLOW)
    return rng.choice(["evaluate", "figures", "rename-begin:metrics.json"]), 1, rng.uniform(0, 0.3)


def final_state(run: Path) -> dict:
    """What must equal between a killed-and-resumed run and an uninterrupted one."""
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("train_seconds")
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in state["history"]]
    return {
        "model": state["model"],
        "optimizer": state["optimizer"]["state"],
        "epoch": state["epoch"],
        "val_elbo": [h["val_elbo"] for h in history],
        "metrics": metrics,
        "scores": (run / "scores.csv").read_text(),
        "figures": sorted(p.name for p in (run / "figures").iterdir()),
        "temporaries": sorted(p.name for p in run.iterdir() if ".tmp" in p.name),
    }


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a["model"].keys() == b["model"].keys(), what
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{what}: parameter {k} differs"
    assert a["optimizer"].keys() == b["optimizer"].keys(), what
    for i in a["optimizer"]:
        for k, v in a["optimizer"][i].items():
            assert torch.equal(v, b["optimizer"][i][k]), f"{what}: optimiser state {i}.{k}"
    for key in ("epoch", "val_elbo", "metrics", "scores", "figures"):
        assert a[key] == b[key], f"{what}: {key} differs"
    assert a["temporaries"] == [] and b["temporaries"] == [], what


def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    zygote = Zygote(tmp_path)
    try:
        fresh = ["fit", *FLAGS, "--out"]
        code, _, err = zygote.run([*fresh, str(tmp_path / "reference")])
        assert code == 0, err
        reference = final_state(tmp_path / "reference")

        rng = random.Random(8)
        tried, landed, runs = 0, {}, 0
        restarts = Counter()  # how the run directory was found after a kill
        while sum(landed.values()) < MIN_KILLS:
            runs += 1
            run = tmp_path / f"run{runs}"
            kills_this_run = 0
            while True:
                resume = (run / "config.toml").is_file()
                if kills_this_run and not resume:
                    restarts["started again (no config.toml yet)"] += 1
                argv = (
                    ["fit", "--out", str(run), "--resume", "--quiet"]
                    if resume
                    else [*fresh, str(run)]
                )
                target = None
                if sum(landed.values()) < MIN_KILLS and kills_this_run < 12:
                    target = choose_kill(rng, fresh=not resume)
                    tried += 1
                code, log, err = zygote.run(argv, target)
                assert "Traceback" not in err, err
                restarts["fell back to checkpoint.prev.pt"] += (
                    "using the previous checkpoint" in err
                )
                restarts["resumed from epoch 0 (no checkpoint yet)"] += "no checkpoint in" in err
                if code == -signal.SIGKILL:
                    phase = where(log)
                    landed[phase] = landed.get(phase, 0) + 1
                    kills_this_run += 1
                    continue
                assert code == 0, f"{argv} ended with {code}: {err}"
                break
            assert_same(final_state(run), reference, f"run {runs} after {kills_this_run} kills")
            shutil.rmtree(run)
        survived = sum(landed.values())
        print(
            f"\nkill points: {tried} tried, {survived} landed and all {survived} survived "
            f"(resume equal to the uninterrupted run) over {runs} runs; by phase: "
            f"{dict(sorted(landed.items()))}; after a kill: {dict(restarts)}"
        )
        assert survived >= MIN_KILLS
        assert len(landed) >= 4, landed  # kills landed in at least four different phases
        assert landed.get("checkpoint write", 0) >= 2, landed
    finally:
        zygote.close()


def test_truncated_newest_checkpoint_falls_back_through_the_cli(tmp_path):
    """A real ``python -m ppl_vae.cli`` resume of a run whose newest checkpoint is cut short."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "ppl_vae.cli"]
    flags = [*FLAGS[:1], "3", *FLAGS[2:]]  # 3 epochs
    full, part = tmp_path / "full", tmp_path / "part"
    r = subprocess.run([*cli, "fit", *flags, "--out", str(full)], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr
    shutil.copytree(full, part)
    data = (part / "checkpoint.pt").read_bytes()
    (part / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    r = subprocess.run(
        [*cli, "fit", "--out", str(part), "--resume", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "truncated or corrupted" in r.stderr and "using the previous checkpoint" in r.stderr
    assert "(epoch 2)" in r.stderr and "Traceback" not in r.stderr
    assert_same(final_state(part), final_state(full), "resumed from the previous checkpoint")
