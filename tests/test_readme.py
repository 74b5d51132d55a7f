"""The README's commands and its Python example are true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README, flags=re.S | re.M)


def test_first_screen_holds_the_two_newcomer_commands():
    first = README.split("\n## ")[0]
    commands = [ln for ln in _blocks("bash")[0].splitlines() if ln.strip() and not ln.startswith("#")]
    assert first.count("```bash") == 1
    assert len(commands) == 2
    install = 'pip install -e ".[dev]"'
    assert commands[0].startswith(install) and "ppl-vae fit" in commands[0] and "runs/digits" in commands[0]
    assert commands[1].startswith(install) and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "README.md" in ci  # CI reads the commands from here rather than copying them


@pytest.mark.slow
def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = [b for b in _blocks("python") if b.startswith("from ppl_vae import")]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # our own README
    assert (tmp_path / "runs" / "api-example" / "metrics.json").is_file()
    assert namespace["again"]["log_likelihood_samples"] == 2000


def test_documented_prior_is_the_example_prior():
    example = (ROOT / "examples" / "new_prior.py").read_text()
    for name in ("class StudentTPrior(Prior):", "class TwoClusterPrior(Prior):"):
        start = README.index(name)
        snippet = README[start : README.index("```", start)].strip()
        assert snippet in example
        assert len(snippet.splitlines()) <= 20


def test_plain_pyro_example_runs_and_trains(monkeypatch, tmp_path):
    import pyro

    monkeypatch.chdir(tmp_path)
    (code,) = [b for b in _blocks("python") if b.startswith("import pyro\n")]
    code = code.replace("epochs=5", "epochs=1").replace("range(200)", "range(30)")
    namespace: dict = {}
    with pyro.settings.context(module_local_params=False):  # a user's script: Pyro's default
        exec(compile(code, "README.md", "exec"), namespace)  # our own README
    # 30 SVI steps on top of one epoch: -ELBO per binarised digit well below an untrained
    # model's 64 log 2 = 44 nats
    assert namespace["loss"] / 128 < 40
    pyro.clear_param_store()
