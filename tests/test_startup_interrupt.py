"""SIGINT while the command is still starting (importing torch and Pyro): "interrupted",
exit 130, no traceback and nothing written, as SIGINT during training already gives."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_import_of_the_package_does_not_import_torch():
    code = "import sys, ppl_vae, ppl_vae.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sigint_during_start_up_is_one_line_and_exit_130(tmp_path):
    script = shutil.which("ppl-vae") or str(Path(sys.executable).with_name("ppl-vae"))
    out = tmp_path / "run"
    p = subprocess.Popen(
        [script, "fit", "--epochs", "1000", "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    # past the interpreter's own start-up (a signal before any of our code runs is Python's to
    # report), well before torch is imported (over a second here)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines() == ["ppl-vae: interrupted"], err
    assert not out.exists()
