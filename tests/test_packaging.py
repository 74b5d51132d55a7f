"""models/ and guides/ install as ppl_vae.models and ppl_vae.guides, editable and as a wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_namespace():
    import ppl_vae.guides.encoders
    import ppl_vae.models.priors.gaussian

    assert Path(ppl_vae.models.priors.gaussian.__file__).resolve().parent == ROOT / "models" / "priors"
    assert Path(ppl_vae.guides.encoders.__file__).resolve().parent == ROOT / "guides" / "encoders"
    dist = distribution("ppl-vae")
    assert dist.metadata["Requires-Python"] == ">=3.10"
    requires = " ".join(dist.requires or [])
    for dep in ("pyro-ppl", "torch", "torchvision", "numpy", "arviz", "matplotlib", "scikit-learn", "tqdm"):
        assert dep in requires, dep


def test_no_generic_top_level_names_are_claimed():
    r = subprocess.run(
        [sys.executable, "-c", "import models"], capture_output=True, text=True, cwd="/"
    )
    assert r.returncode != 0 and "No module named 'models'" in r.stderr


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("ppl_vae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ppl_vae/models/priors/gaussian.py" in names
    assert "ppl_vae/models/likelihoods/bernoulli.py" in names
    assert "ppl_vae/guides/encoders/resnet.py" in names
    assert "ppl_vae/models/decoders/resnet.py" in names
    assert "ppl_vae/guides/labels/__init__.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"ppl_vae", next(n.split("/")[0] for n in names if ".dist-info/" in n)}
    assert "ppl_vae/cli/__init__.py" in names
