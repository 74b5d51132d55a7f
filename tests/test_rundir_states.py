"""Run-directory states (issue 18): any sequence of operations on one ``--out`` keeps it safe.

Hypothesis (derandomised) draws sequences of operations on one run directory: a new ``fit``,
``fit --overwrite``, ``fit --resume`` (with or without more epochs), a SIGKILL of a real
``ppl-vae fit`` process (continuing the run, or overwriting it) at a drawn moment, ``evaluate``,
``sample``, and the user dropping files of their own into it (``notes.txt``,
``figures/my_plot.png``, ``analysis/table.csv``). After every step:

(a) checkpoints: every checkpoint file present loads, and the newest complete checkpoint from
    before the step is still the newest, bitwise, or a later epoch replaced it, unless the step
    was an explicit ``--overwrite``; a finished ``--overwrite`` leaves a complete new run and no
    file of the old one;
(b) the user's files: never modified or deleted (bytes and mtime compared);
(c) the directory: a refused command (exit 2) prints one line, no traceback, and changes
    nothing; no command ends any other way but 0, 2 or the kill; and ``--resume`` on a copy of
    the directory either finishes the run (exit 0, every epoch in ``config.toml`` done) or is
    refused in one line with exit 2.

Most steps call ``ppl_vae.cli.main`` in-process. The kills go through the forking wrapper of
``tests/test_kill_resume.py`` (a real process running ``ppl_vae.cli.main`` with checkpoint
writes and renames held open a little, forked from one that has imported torch once), killed
at a drawn moment: a delay after it starts, after its n-th optimiser step, inside a checkpoint
write or rename, or during the final evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ppl_vae.cli import main
from ppl_vae.models.errors import ConfigError
from ppl_vae.training.checkpoint import (
    BEST,
    CHECKPOINT,
    PREVIOUS,
    has_checkpoint,
    is_temporary,
    load_checkpoint,
    load_state_file,
)
from ppl_vae.training.rundir import LOCK, is_run_dir, prepare_run_dir

from .test_kill_resume import SLOW, Zygote, where

pytestmark = pytest.mark.slow

FAST = [
    "--hidden-dims",
    "8",
    "--latent-dim",
    "2",
    "--log-likelihood-samples",
    "2",
    "--max-train",
    "64",
    "--batch-size",
    "16",
    "--device",
    "cpu",
    "--quiet",
]
USER_FILES = {
    "notes.txt": b"my notes\n",
    "figures/my_plot.png": b"\x89PNG my own plot",
    "analysis/table.csv": b"run,score\na,1\n",
}
#: Where a kill lands: the wrapper's log line, how often a training epoch logs it (0: once per
#: command) and the range of the delay after it (s).
MOMENTS = {
    "start": ("main", 0, 0.6),
    "training": ("step", 4, 0.01),  # 64 points in batches of 16
    "checkpoint write": ("save-begin", 1, 2 * SLOW),
    "checkpoint rename": ("rename-begin:checkpoint.pt", 1, 2 * SLOW),
    "evaluation": ("evaluate", 0, 0.2),
    "metrics write": ("rename-begin:metrics.json", 0, 2 * SLOW),
}
TALLY: Counter[str] = Counter()

epochs = st.integers(1, 3)
operations = st.one_of(
    st.tuples(st.just("fit"), epochs),
    st.tuples(st.just("overwrite"), epochs),
    st.tuples(st.just("resume"), st.one_of(st.none(), epochs)),
    st.tuples(
        st.just("kill"),
        st.sampled_from(["continue", "overwrite"]),
        st.sampled_from(sorted(MOMENTS)),
        st.integers(1, 12),  # the occurrence of the moment
        st.floats(0.0, 1.0),  # the delay, as a fraction of the moment's range
        epochs,
    ),
    st.tuples(st.just("evaluate")),
    st.tuples(st.just("sample")),
    st.tuples(st.just("user file"), st.sampled_from(sorted(USER_FILES))),
    st.tuples(st.just("user file"), st.sampled_from(sorted(USER_FILES))),  # twice as often
)


@dataclass
class Outcome:
    code: int  # -9: killed
    err: str
    log: list[str] = field(default_factory=list)


def run_cli(argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return Outcome(code, err.getvalue())


def error_lines(err: str) -> list[str]:
    """stderr without the warnings ``main`` prints (each with the source line below it)."""
    lines = err.splitlines()
    keep, skip = [], False
    for line in lines:
        if skip:
            skip = False
            continue
        if "Warning:" in line:
            skip = True
            continue
        if line.strip():
            keep.append(line)
    return keep


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file's bytes but the lock's (its holder removes it; a kill leaves it)."""
    if not d.exists():
        return {}
    return {
        str(p.relative_to(d)): p.read_bytes()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def stats(d: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in d.rglob("*")
        if p.is_file()
    }


def saved_epochs(d: Path) -> int:
    text = (d / "config.toml").read_text()
    return int(next(ln for ln in text.splitlines() if ln.startswith("epochs =")).split("=")[1])


def newest_checkpoint(d: Path) -> tuple[int, dict[str, torch.Tensor]] | None:
    if not has_checkpoint(d):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "using the previous checkpoint"
        state = load_checkpoint(d)
    return int(state["epoch"]), state["model"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_complete(d: Path, what: str) -> None:
    """A finished run: ``config.toml``'s epochs done in its checkpoint, history and metrics."""
    assert (d / "config.toml").read_text().startswith("# ppl-vae"), what
    wanted = saved_epochs(d)
    state = load_state_file(d / CHECKPOINT)
    assert int(state["epoch"]) == wanted, f"{what}: checkpoint at {state['epoch']} of {wanted}"
    rows = (d / "history.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == wanted, f"{what}: history.csv has {len(rows)} rows, not {wanted}"
    metrics = json.loads((d / "metrics.json").read_text())
    assert "test_elbo" in metrics, what
    assert (d / BEST).is_file() and (d / "figures").is_dir(), what
    assert not [p for p in d.iterdir() if is_temporary(p)], what


class RunDirectory:
    """One ``--out`` under a sequence of steps, with what must hold after each."""

    def __init__(self, root: Path, zygote: Zygote) -> None:
        self.root = root
        self.dir = root / "run"
        self.zygote = zygote
        self.user: dict[str, tuple[bytes, int]] = {}
        self.newest = newest_checkpoint(self.dir)
        self.checked: dict[str, bytes] | None = None  # the last state checked for (c)

    # -- the steps ---------------------------------------------------------------------------

    def fit_argv(self, e: int, overwrite: bool = False) -> list[str]:
        return ["fit", "--epochs", str(e), *FAST, "--out", str(self.dir)] + (
            ["--overwrite"] if overwrite else []
        )

    def resume_argv(self, e: int | None) -> list[str]:
        return ["fit", "--out", str(self.dir), "--resume", "--quiet"] + (
            ["--epochs", str(e)] if e is not None else []
        )

    def step(self, op: tuple) -> None:
        name = op[0]
        TALLY[name] += 1
        before, before_stats = snapshot(self.dir), stats(self.dir) if self.dir.exists() else {}
        overwrite = name == "overwrite"
        if name == "user file":
            path = self.dir / op[1]
            if path.exists():
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(USER_FILES[op[1]])
            self.user[op[1]] = (USER_FILES[op[1]], path.stat().st_mtime_ns)
            outcome = Outcome(0, "")
        elif name == "fit":
            outcome = run_cli(self.fit_argv(op[1]))
        elif name == "overwrite":
            outcome = run_cli(self.fit_argv(op[1], overwrite=True))
        elif name == "resume":
            outcome = run_cli(self.resume_argv(op[1]))
        elif name == "evaluate":
            outcome = run_cli(["evaluate", str(self.dir), "--quiet"])
        elif name == "sample":
            outcome = run_cli(["sample", str(self.dir), "-n", "4"])
        else:
            _, mode, moment, n, fraction, e = op
            overwrite = mode == "overwrite"
            if overwrite:
                argv = self.fit_argv(e, overwrite=True)
            elif (self.dir / "config.toml").is_file():
                argv = self.resume_argv(saved_epochs(self.dir) + e)  # work left to kill
            else:
                argv = self.fit_argv(e)
            mark, per_epoch, span = MOMENTS[moment]
            n = min(n, per_epoch * e) if per_epoch else 1  # of the e epochs this command trains
            code, log, err = self.zygote.run(argv, (mark, n, fraction * span))
            outcome = Outcome(code, err, log)
            killed = code == -signal.SIGKILL
            TALLY[f"kill landed: {where(log)}" if killed else f"kill missed: exit {code}"] += 1
        self.check(op, overwrite, outcome, before, before_stats)

    # -- the invariants ----------------------------------------------------------------------

    def check(
        self,
        op: tuple,
        overwrite: bool,
        outcome: Outcome,
        before: dict[str, bytes],
        before_stats: dict[str, tuple[int, int]],
    ) -> None:
        what = f"after {op}: exit {outcome.code}, stderr {outcome.err!r}"
        # (b) the user's files, untouched
        for rel, (data, mtime) in self.user.items():
            p = self.dir / rel
            assert p.is_file(), f"{what}: the user's {rel} was deleted"
            assert p.read_bytes() == data, f"{what}: the user's {rel} was modified"
            assert p.stat().st_mtime_ns == mtime, f"{what}: the user's {rel} was rewritten"
        # (c) how the command ended
        assert "Traceback" not in outcome.err, what
        assert outcome.code in (0, 2, -signal.SIGKILL), what
        if outcome.code == 2:
            lines = error_lines(outcome.err)
            assert len(lines) == 1 and lines[0].startswith("ppl-vae"), what
            assert snapshot(self.dir) == before, f"{what}: a refused command changed the directory"
        # (a) the checkpoints
        for name in (CHECKPOINT, PREVIOUS, BEST):
            if (self.dir / name).exists():
                try:
                    load_state_file(self.dir / name)
                except ConfigError as e:
                    pytest.fail(f"{what}: {name} does not load: {e}")
        newest = newest_checkpoint(self.dir)
        if overwrite and outcome.code != 2:
            if outcome.code == 0:
                assert_complete(self.dir, what)
                stale = [
                    rel
                    for rel, st_ in stats(self.dir).items()
                    if rel not in self.user
                    and Path(rel).name != LOCK
                    and before_stats.get(rel) == st_
                ]
                assert not stale, f"{what}: files of the overwritten run are left: {stale}"
        elif self.newest is not None:
            assert newest is not None, f"{what}: the checkpoint of epoch {self.newest[0]} is lost"
            assert newest[0] >= self.newest[0], f"{what}: back to epoch {newest[0]}"
            if newest[0] == self.newest[0]:
                assert same_weights(newest[1], self.newest[1]), f"{what}: checkpoint changed"
        self.newest = newest
        if outcome.code == 0 and op[0] in ("fit", "overwrite", "resume"):
            assert_complete(self.dir, what)
        # (c) resumable, or refused in one line
        now = snapshot(self.dir)
        if now != self.checked:
            self.checked = now
            self.check_resumable(what)

    def check_resumable(self, what: str) -> None:
        copy = self.root / "resume-copy"
        shutil.rmtree(copy, ignore_errors=True)
        if self.dir.exists():
            shutil.copytree(self.dir, copy)
        outcome = run_cli(["fit", "--out", str(copy), "--resume", "--quiet"])
        what = f"{what}; then --resume: exit {outcome.code}, stderr {outcome.err!r}"
        assert "Traceback" not in outcome.err, what
        if outcome.code == 0:
            assert_complete(copy, what)
            TALLY["resumable"] += 1
        else:
            assert outcome.code == 2, what
            lines = error_lines(outcome.err)
            assert len(lines) == 1 and lines[0].startswith("ppl-vae"), what
            TALLY["resume refused"] += 1
        shutil.rmtree(copy, ignore_errors=True)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.mark.filterwarnings("ignore:no checkpoint in:RuntimeWarning")  # a resume after a kill
def test_any_sequence_of_operations_keeps_the_run_directory_safe(zygote):
    @settings(max_examples=6, deadline=None, derandomize=True, database=None)
    @given(st.lists(operations, min_size=2, max_size=5))
    # The scenarios of issue 18 itself, tried first, then the drawn ones.
    @example([("fit", 1), ("user file", "figures/my_plot.png"), ("overwrite", 2), ("resume", 3)])
    @example(
        [
            ("user file", "notes.txt"),
            ("kill", "continue", "checkpoint write", 2, 0.5, 2),
            ("evaluate",),
            ("kill", "continue", "evaluation", 1, 0.5, 1),
            ("resume", None),
        ]
    )
    @example(
        [
            ("fit", 1),
            ("sample",),
            ("user file", "analysis/table.csv"),
            ("kill", "overwrite", "checkpoint rename", 1, 0.5, 2),
            ("overwrite", 1),
        ]
    )
    def sequence(ops: list[tuple]) -> None:
        with tempfile.TemporaryDirectory() as root:
            d = RunDirectory(Path(root), zygote)
            for op in ops:
                d.step(op)

    sequence()
    print(f"\nrun-directory states: {dict(sorted(TALLY.items()))}")


def test_overwrite_removes_the_old_runs_outputs_and_keeps_the_users_files(tmp_path):
    """Found by the property test: ``--overwrite`` deleted the user's ``figures/my_plot.png``
    (the whole ``figures/`` went) and kept the old run's ``evaluation.json`` and samples."""
    d = tmp_path / "run"
    assert run_cli(["fit", "--epochs", "1", *FAST, "--out", str(d)]).code == 0
    for argv in (["evaluate", str(d), "--quiet"], ["sample", str(d), "-n", "4"], ["score", str(d)]):
        assert run_cli(argv).code == 0, argv
    mine = {"figures/my_plot.png": b"mine", "score-test/my_notes.txt": b"mine", "notes.txt": b"x"}
    for rel, data in mine.items():
        (d / rel).write_bytes(data)
    old = {rel for rel in snapshot(d) if rel not in mine}
    assert {"evaluation.json", "samples_n4.npy", "score-test/summary.json"} <= old

    prepare_run_dir(d, resume=False, overwrite=True)  # what a kill right after it leaves
    assert is_run_dir(d), "a killed overwrite left no config.toml: the directory is no run"
    assert sorted(snapshot(d)) == sorted([*mine, "config.toml"])

    assert run_cli(["fit", "--epochs", "1", *FAST, "--out", str(d), "--overwrite"]).code == 0
    after = snapshot(d)
    assert all(after[rel] == data for rel, data in mine.items())
    assert not {"evaluation.json", "samples_n4.npy", "samples_n4.png"} & set(after)
    assert not [rel for rel in after if rel.startswith("score-test/") and rel not in mine]
