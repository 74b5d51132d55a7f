"""Soak test (issue 18, item 4; not in CI): hundreds of SIGKILLs across one run, each resumed.

One tiny ``ppl-vae fit`` run is started as a real process (``python -m ppl_vae.cli``) and
SIGKILLed at random moments, ``--kills`` times; after every kill ``fit --resume`` continues it
(a fresh ``fit`` when the kill came before ``config.toml``), and that process is the next one
killed. Kill moments, drawn with ``--seed``:

- start-up: a random delay from the process start (imports, data, model, the checkpoint read);
- inside a checkpoint write: the moment the k-th checkpoint temporary file
  (``.checkpoint.pt.tmp*``, ``.best.pt.tmp*``) of the process appears, plus 0-3 ms;
- training: a random delay after the process's first checkpoint write;
- the final evaluation: once every epoch is trained, a delay inside what follows (test
  log-likelihood, ``scores.csv``, figures, ``metrics.json``).

k and the delays are paced so that training ends after about three quarters of the kills; the
rest land in the final evaluation. When the kills are spent the last ``--resume`` runs to the
end, and the run is compared with an uninterrupted run of the same seed: every tensor of ``checkpoint.pt``
and ``best.pt`` (model and optimiser, ``torch.equal``), ``history.csv`` (without the wall-clock
``seconds``), ``metrics.json`` (without ``train_seconds``) and ``scores.csv``.

    OMP_NUM_THREADS=1 python benchmarks/soak_kill_resume.py            # 200 kills
    python benchmarks/soak_kill_resume.py --kills 20 --epochs 20       # a quick look

Prints the kills tried, those that landed (the process died of the kill, not having finished
first) by phase, those survived (the next process resumed without error), every failure with
its stderr, and whether the final run is bitwise the uninterrupted one. Exit code 0 only if
every kill was survived and the run is bitwise equal.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from ppl_vae.cli import Parser, run_command

FLAGS = [
    "--hidden-dims",
    "8",
    "--latent-dim",
    "2",
    "--max-train",
    "64",
    "--batch-size",
    "16",
    "--log-likelihood-samples",
    "2",
    "--device",
    "cpu",
    "--quiet",
]
TEMPORARY = (".checkpoint.pt.tmp", ".best.pt.tmp")


def command(run: Path, epochs: int, seed: int) -> list[str]:
    cli = [sys.executable, "-m", "ppl_vae.cli", "fit", "--out", str(run)]
    if (run / "config.toml").is_file():
        return [*cli, "--resume", "--quiet"]
    return [*cli, "--epochs", str(epochs), "--seed", str(seed), *FLAGS]


def temporaries(run: Path) -> list[str]:
    try:
        return [n for n in os.listdir(run) if n.startswith(TEMPORARY)]
    except FileNotFoundError:
        return []


def epochs_done(run: Path) -> int:
    """Rows in ``history.csv`` (written atomically after each epoch's checkpoint)."""
    try:
        return max(0, len((run / "history.csv").read_text().strip().splitlines()) - 1)
    except FileNotFoundError:
        return 0


class Process:
    """One ``ppl-vae fit`` process, watched: when checkpoint temporaries appear, when it ends."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        self.err_path = stderr
        self.err = open(stderr, "wb")  # closed in wait()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.err)
        self.writes: list[float] = []  # times (from start) a checkpoint temporary appeared

    def watch(self, run: Path, until: float, kth_write: int | None = None) -> bool:
        """Poll until ``until`` s after the start or the ``kth_write``-th checkpoint write
        begins; return whether the process is still running then."""
        seen = False
        while self.proc.poll() is None:
            now = time.monotonic() - self.start
            present = bool(temporaries(run))
            if present and not seen:
                self.writes.append(now)
                if kth_write is not None and len(self.writes) >= kth_write:
                    return True
            seen = present
            if kth_write is None and now >= until:
                return True
            time.sleep(0.0003)
        return False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def watch_training(self, run: Path, epochs: int) -> bool:
        """Poll until ``history.csv`` has every epoch; whether the process is still running."""
        while self.proc.poll() is None:
            if epochs_done(run) >= epochs:
                return True
            time.sleep(0.002)
        return False

    def kill(self) -> bool:
        """SIGKILL it; whether it was still running."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def wait(self) -> tuple[int, str]:
        code = self.proc.wait()
        self.err.close()
        return code, self.err_path.read_text(errors="replace")


def final_state(run: Path) -> dict:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    with open(run / "history.csv", newline="") as f:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    metrics = json.loads((run / "metrics.json").read_text())
    metrics.pop("train_seconds", None)
    return {
        "tensors": {
            **{f"model.{k}": v for k, v in state["model"].items()},
            **{
                f"optimizer.{i}.{k}": v
                for i, s in state["optimizer"]["state"].items()
                for k, v in s.items()
                if torch.is_tensor(v)
            },
            **{f"best.{k}": v for k, v in best["model"].items()},
        },
        "epoch": state["epoch"],
        "history": history,
        "metrics": metrics,
        "scores": (run / "scores.csv").read_text(),
        "leftovers": sorted(n for n in os.listdir(run) if ".tmp" in n),
    }


def differences(a: dict, b: dict) -> list[str]:
    out = []
    if a["tensors"].keys() != b["tensors"].keys():
        out.append("different tensors saved")
    out += [
        f"tensor {k}"
        for k in a["tensors"]
        if k in b["tensors"] and not torch.equal(a["tensors"][k], b["tensors"][k])
    ]
    out += [k for k in ("epoch", "history", "metrics", "scores") if a[k] != b[k]]
    if a["leftovers"]:
        out.append(f"temporary files left: {a['leftovers']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=200, help="kills to try (default 200)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed and the kills' (default 0)")
    p.add_argument("--out", type=Path, help="working folder (default: a temporary one, removed)")
    p.add_argument("--epochs", type=int, help="epochs of the run (default: kills / 2, >= 10)")
    args = p.parse_args(argv)
    epochs = args.epochs or max(10, args.kills // 2)
    work = args.out or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    reference, run = work / "reference", work / "run"
    for d in (reference, run):
        shutil.rmtree(d, ignore_errors=True)
    rng = random.Random(args.seed)
    t0 = time.monotonic()

    # The uninterrupted run, watched to learn how long start-up, an epoch and the end take.
    ref = Process(command(reference, epochs, args.seed), work / "reference.err")
    ref.watch(reference, math.inf)
    code, err = ref.wait()
    if code != 0:
        print(f"the uninterrupted run failed (exit {code}):\n{err}")
        return 1
    life = time.monotonic() - ref.start
    startup = ref.writes[0] if ref.writes else life / 2
    epoch_s = (ref.writes[-1] - ref.writes[0]) / max(1, len(ref.writes) - 1) if ref.writes else 0
    ending = max(0.2, life - (ref.writes[-1] if ref.writes else startup))
    print(
        f"uninterrupted run: {life:.1f} s ({startup:.1f} s to the first checkpoint write, "
        f"{epoch_s * 1000:.0f} ms per checkpoint write, {ending:.1f} s after the last)",
        flush=True,
    )

    landed, missed, failures, resumes = Counter(), 0, [], 0
    train_kills = round(0.75 * args.kills)
    trained_by = None  # the kill before which every epoch was trained
    for i in range(args.kills):
        done = epochs_done(run)
        if done >= epochs and trained_by is None:
            trained_by = i
        proc = Process(command(run, epochs, args.seed), work / "process.err")
        resumes += "--resume" in proc.proc.args
        per_kill = (epochs - done) / max(1, train_kills - i)  # epochs to train before a kill
        r = rng.random()
        if r < 0.1:  # start-up: imports, data, model, reading the checkpoint
            mode = "start-up"
            running = proc.watch(run, rng.uniform(0.0, 0.9 * startup))
        elif done < epochs and i < train_kills and r < 0.55:
            # the k-th checkpoint write of this process (checkpoint.pt and best.pt: up to two
            # an epoch), paced to end training after train_kills kills
            mode = "checkpoint write"
            k = 1 + rng.randint(0, math.ceil(4 * per_kill / 0.45))
            running = proc.watch(run, math.inf, kth_write=k)
            if running:
                time.sleep(rng.uniform(0.0, 0.003))
        elif done < epochs and i < train_kills:
            # training: a delay after this process's first checkpoint write
            mode = "training"
            running = proc.watch(run, math.inf, kth_write=1)
            delay = rng.uniform(0.0, 2 * per_kill / 0.45 * max(epoch_s, 0.005))
            running = running and proc.watch(run, proc.elapsed() + delay)
        else:
            # the final evaluation: the rest of training, then a delay inside what follows
            # (test log-likelihood, scores.csv, figures, metrics.json)
            mode = "final evaluation"
            running = proc.watch_training(run, epochs)
            if done >= epochs:  # this process only evaluates: after its start-up
                running = running and proc.watch(run, startup * rng.uniform(0.8, 1.0))
            running = running and proc.watch(run, proc.elapsed() + rng.uniform(0, ending))
        killed = running and proc.kill()
        code, err = proc.wait()
        if proc.writes and mode != "final evaluation":  # start-up times drift with the load
            startup = 0.7 * startup + 0.3 * proc.writes[0]
        if killed and code == -signal.SIGKILL:
            left = temporaries(run)
            landed["checkpoint write (its temporary file left)" if left else mode] += 1
        else:
            missed += 1  # the process ended before the kill
        if code not in (0, -signal.SIGKILL) or "Traceback" in err:
            failures.append((i, code, err))
            print(f"kill {i}: the process after the kill failed (exit {code}):\n{err}", flush=True)
        if (i + 1) % 20 == 0:
            print(
                f"{i + 1} kills tried, {sum(landed.values())} landed, epoch {epochs_done(run)}"
                f"/{epochs}, {time.monotonic() - t0:.0f} s",
                flush=True,
            )

    # The last resume, to the end.
    proc = Process(command(run, epochs, args.seed), work / "process.err")
    proc.watch(run, math.inf)
    code, err = proc.wait()
    if code != 0:
        failures.append((args.kills, code, err))
        print(f"the final --resume failed (exit {code}):\n{err}")
    diff = differences(final_state(run), final_state(reference)) if code == 0 else ["no run"]
    n_landed = sum(landed.values())
    print(
        f"\n{args.kills} kills tried over one {epochs}-epoch run, {n_landed} landed "
        f"({dict(landed.most_common())}), {missed} missed (the process finished first), "
        f"{resumes} resumes, every epoch trained after {trained_by} kills; {n_landed - len(failures)} of {n_landed} survived, "
        f"{len(failures)} failure(s)\n"
        f"bitwise equal to the uninterrupted run: {'yes' if not diff else 'no: ' + ', '.join(diff)}"
        f"\nwall time {time.monotonic() - t0:.0f} s"
    )
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failures and not diff else 1


if __name__ == "__main__":
    sys.exit(run_command("soak_kill_resume.py", main))
