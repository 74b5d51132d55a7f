"""The scripts in ``examples/`` and ``benchmarks/`` answer bad input as ``ppl-vae`` does.

Every script's entry point goes through :func:`ppl_vae.cli.run_command`: a
:class:`~ppl_vae.ConfigError` is one line on stderr and exit code 2, never a traceback, and no
file is written.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ppl_vae import ConfigError, TrainingError
from ppl_vae.cli import EXIT_USAGE, run_command

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("examples/*.py"), *ROOT.glob("benchmarks/*.py")])

#: the scripts with a ``--device`` option (run with ``--device cuda`` where CUDA is hidden)
DEVICE_SCRIPTS = [
    "benchmarks/eval_memory.py",
    "benchmarks/latent_structure_digits.py",
    "benchmarks/likelihoods_digits.py",
    "benchmarks/m2_speed.py",
    "benchmarks/priors_digits.py",
    "benchmarks/speed.py",
    "benchmarks/von_mises_gradient_variance.py",
    "examples/svhn_semisupervised.py",
]


# -- run_command ---------------------------------------------------------------------------------
def _raise(e: BaseException):
    def fn():
        raise e

    return fn


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("`labels` must be a positive integer, got -5"), EXIT_USAGE),
        (TrainingError("non-finite loss at epoch 3, batch 7"), 1),
        (OSError(28, "No space left on device", "/runs/a/checkpoint.pt"), 1),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1),
    ],
)
def test_run_command_turns_an_error_into_one_line_and_its_exit_code(error, code, capsys):
    assert run_command("my_script.py", _raise(error)) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("my_script.py: error: "), err
    first = str(error).splitlines()[0] if not isinstance(error, OSError) else error.strerror
    assert first in err


def test_run_command_returns_the_scripts_own_code_and_keeps_a_bugs_traceback(capsys):
    assert run_command("s.py", lambda: None) == 0
    assert run_command("s.py", lambda: 3) == 3
    assert run_command("s.py", lambda: [{"rows": 1}]) == 0  # a script's results: success
    assert run_command("s.py", _raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "s.py: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug is not bad input: its traceback stays
        run_command("s.py", lambda: 1 / 0)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not an out-of-memory error
        run_command("s.py", _raise(RuntimeError("shape mismatch")))


# -- every script uses it ------------------------------------------------------------------------
@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_enters_through_run_command(path):
    tree = ast.parse(path.read_text())
    guards = [
        node for node in tree.body
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
    ]  # fmt: skip
    assert len(guards) == 1, f"{path.name}: no `if __name__ == '__main__':` block"
    call = f"sys.exit(run_command({path.name!r}, main))"
    assert call in ast.unparse(guards[0]), f"{path.name}: end with {call}"


# -- and answers bad input in one line -----------------------------------------------------------
def _run(argv: list[str], cwd: Path) -> subprocess.Popen:
    # CUDA hidden: the same answer on a machine with a GPU
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MPLBACKEND="Agg")
    return subprocess.Popen(
        [sys.executable, *argv], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def _check_one_line_error(name: str, code: int, out: str, err: str) -> None:
    assert code == EXIT_USAGE, f"{name}: exit {code}\n{err[-2000:]}"
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: "), err[-2000:]
    assert "Traceback" not in err and out == "", out


@pytest.mark.slow
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    procs = {}
    for script in DEVICE_SCRIPTS:  # all at once: each start is an import of torch and Pyro
        cwd = tmp_path / Path(script).stem
        cwd.mkdir()
        procs[script] = (_run([str(ROOT / script), "--device", "cuda"], cwd), cwd)
    done = {script: (*proc.communicate(timeout=300), cwd) for script, (proc, cwd) in procs.items()}
    for script, (out, err, cwd) in done.items():
        _check_one_line_error(Path(script).name, procs[script][0].returncode, out, err)
        assert "--device cuda was asked for but no CUDA device is available" in err
        assert list(cwd.iterdir()) == [], f"{script} wrote {list(cwd.iterdir())}"


@pytest.mark.slow
def test_the_svhn_example_without_the_data_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "data").mkdir()
    proc = _run(
        [str(ROOT / "examples" / "svhn_semisupervised.py"), "--data-root", "data", "--out", "r"],
        tmp_path,
    )
    out, err = proc.communicate(timeout=300)
    _check_one_line_error("svhn_semisupervised.py", proc.returncode, out, err)
    assert "data set 'svhn' not found" in err and "train_32x32.mat" in err and "--download" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no run directory begun


#: (script, arguments, what the one-line error names): a script's own options
BAD_OPTIONS = [
    ("benchmarks/kl_recipes_digits.py", ["--models", "vae,nothing"], "'vae,nothing'"),
    ("benchmarks/kl_recipes_digits.py", ["--seeds", "0,x"], "integers"),
    ("benchmarks/latent_structure_digits.py", ["--rows", "gaussian,nope"], "'gaussian,nope'"),
    ("benchmarks/m2_speed.py", ["--cases", "99"], "['64', '784', '3x32x32']"),
    ("benchmarks/m2_speed.py", ["--guides", "exact"], "'exact'"),
    ("benchmarks/priors_digits.py", ["--latent-dims", "2,five"], "integers"),
    ("benchmarks/ssl_defaults.py", ["--datasets", "mnist"], "['digits', 'fashion14', 'fashion28']"),
    ("benchmarks/ssl_digits.py", ["--guides", "enumerate,guess"], "'enumerate,guess'"),
    ("benchmarks/eval_memory.py", ["--ks", "100,1e3"], "integers"),
    ("examples/compare_estimators.py", ["--seeds", "1,x"], "integers"),
]


def _load(script: str):
    path = ROOT / script
    sys.path.insert(0, str(path.parent))  # ssl_defaults imports its sibling ssl_digits
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.mark.parametrize(("script", "argv", "named"), BAD_OPTIONS, ids=lambda v: str(v))
def test_a_bad_script_option_is_one_line_naming_what_was_expected(
    script, argv, named, capsys, monkeypatch
):
    main = _load(script).main
    monkeypatch.setattr(sys, "argv", [str(ROOT / script)])  # argparse's prog
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == EXIT_USAGE and out == ""
    name = Path(script).name
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: argument {argv[0]}: "), err
    assert named in err


# -- the prepared GPU checks ---------------------------------------------------------------------
GPU_CHECKS = ROOT / "benchmarks" / "gpu_checks.sh"


def test_gpu_checks_refuse_an_unknown_step_in_one_line(tmp_path):
    r = subprocess.run(["bash", str(GPU_CHECKS), "go"], capture_output=True, text=True)
    assert r.returncode == EXIT_USAGE and r.stdout == ""
    assert r.stderr == (
        "gpu_checks.sh: error: expected 'wheels' (here) or 'run' (on the GPU machine), got 'go'\n"
    )


@pytest.mark.slow
def test_gpu_checks_run_their_three_steps_on_the_cpu(tmp_path):
    """The plumbing of the device session's one command: the same steps, CPU, smoke budgets."""
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE="cpu", QUICK="1", OUT=str(out), PYTHON=sys.executable)
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(["bash", str(GPU_CHECKS), "run"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("torch ") and "cuda False" in summary[0]
    assert [line.split(":")[0] for line in summary[1:]] == ["tests", "m2_speed", "speed"]
    assert all(": exit 0 after " in line for line in summary[1:]), summary
    assert "passed" in (out / "tests.log").read_text()
    assert "| 64 | enumerate |" in (out / "m2_speed.log").read_text()
