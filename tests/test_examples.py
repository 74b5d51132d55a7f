"""Every example runs with a tiny budget, and every example is listed here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: example file -> arguments for a tiny run. A new example must be added here.
EXAMPLES: dict[str, list[str]] = {
    "compare_estimators.py": ["--smoke"],
    "new_likelihood.py": ["--smoke"],
    "new_prior.py": ["--smoke"],
    "own_model.py": ["--smoke"],
    "svhn_semisupervised.py": ["--smoke"],
}


def test_every_example_is_listed():
    found = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert found == set(EXAMPLES), f"list new examples in tests/test_examples.py: {found ^ set(EXAMPLES)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs(name, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *EXAMPLES[name]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
