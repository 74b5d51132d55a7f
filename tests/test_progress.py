"""Progress bars: ``fit``'s test log p(x) and its figures show the shared bar
(:func:`ppl_vae.progress.progress_bar`) on a terminal, with the expected description and total;
``quiet`` or a stderr that is no terminal prints nothing; ``compare`` prints a line per row
unless quiet.

The terminal is a ``StringIO`` whose ``isatty()`` is True standing in for stderr, and the bars'
2 s delay is set to 0 so that a fast test's bar is drawn; the bars are recorded by subclassing
``tqdm.auto.tqdm`` (what the helper builds).
"""

from __future__ import annotations

import io
import sys

import pytest
import tqdm.auto

from ppl_vae import fit, progress
from ppl_vae.runs.compare import compare_estimators

TINY = dict(epochs=1, max_train=64, hidden_dims=[8], latent_dim=2, log_likelihood_samples=2)
PAIR = dict(model="hierarchical", model_args={"lower_latent_dims": [2]})


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars(monkeypatch):
    """Every bar the helper builds, in order."""
    made = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.what = kwargs["desc"]  # a disabled bar keeps no desc
            self.shown = not self.disable  # close() disables every bar
            made.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    monkeypatch.setattr(progress, "DELAY_SECONDS", 0.0)
    return made


def _stderr(monkeypatch, stream):
    """``stream`` as stderr, set in the test's body: pytest's capture sets its own stderr
    after the fixtures run."""
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def _shown(bars, what):
    return [b for b in bars if b.what == what and b.shown]


@pytest.mark.parametrize("kind", ["vae", "pair"])
def test_fit_shows_the_test_log_likelihood_bar(bars, monkeypatch, kind):
    terminal = _stderr(monkeypatch, _Terminal())
    result = fit(quiet=False, figures=False, **TINY, **(PAIR if kind == "pair" else {}))
    (bar,) = _shown(bars, "log p(x)")  # the validation ELBO's never shows
    n = len(result.test_scores.log_likelihood)
    assert bar.total == bar.n == 2 * n  # K = 2 importance samples per test point
    assert "log p(x):   0%|" in terminal.getvalue()
    assert f"/{2 * n} [" in terminal.getvalue()  # the total, drawn


def test_fit_shows_the_figures_bar(bars, monkeypatch, tmp_path):
    terminal = _stderr(monkeypatch, _Terminal())
    result = fit(out=tmp_path / "vae", quiet=False, **TINY)
    (bar,) = _shown(bars, "figures")
    written = result.metrics["figures"]
    # elbo, reconstructions, samples, latent, interpolation, the prior's (none for a Gaussian),
    # traversals_z, posterior_z, kl_per_dimension: one step each
    assert "traversals_z.png" in written and len(written) == 8
    assert bar.total == bar.n == 9
    assert "figures:" in terminal.getvalue()


def test_a_pairs_latent_figures_bar(bars, monkeypatch, tmp_path):
    _stderr(monkeypatch, _Terminal())
    fit(out=tmp_path / "pair", quiet=False, **TINY, **PAIR)
    (bar,) = _shown(bars, "figures")
    # traversals and posterior histograms of z1 and z2, and the KL per dimension
    assert bar.total == bar.n == 5


def test_quiet_prints_nothing_on_a_terminal(bars, monkeypatch, tmp_path):
    terminal = _stderr(monkeypatch, _Terminal())
    fit(out=tmp_path / "quiet", quiet=True, **TINY)
    assert {"log p(x)", "figures"} <= {b.what for b in bars}
    assert not any(b.shown for b in bars)
    assert terminal.getvalue() == ""  # nor the training bar


def test_no_terminal_no_bar(bars, monkeypatch, tmp_path):
    stream = _stderr(monkeypatch, io.StringIO())  # isatty() is False: a file or a pipe
    fit(out=tmp_path / "pipe", quiet=False, **TINY)
    assert {"log p(x)", "figures"} <= {b.what for b in bars}
    assert not any(b.shown for b in bars)
    assert stream.getvalue() == ""


def test_the_helper_waits_before_drawing(monkeypatch):
    """The real delay: a phase shorter than 2 s draws nothing."""
    terminal = _stderr(monkeypatch, _Terminal())
    assert progress.DELAY_SECONDS == 2.0
    with progress.progress_bar(True, 10, "short") as bar:
        bar.update(10)
    assert terminal.getvalue() == ""


@pytest.mark.parametrize("quiet", [False, True])
def test_compare_prints_a_line_per_row_unless_quiet(capsys, quiet):
    compare_estimators(
        ["trace", "iwae:2"],
        [0],
        isolate=False,
        quiet=quiet,
        grad_points=[1],
        grad_repeats=2,
        grad_batch_size=16,
        khat_points=2,
        khat_samples=4,
        posterior_points=0,
        posterior_draws=0,
        device="cpu",
        **TINY,
    )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    if quiet:
        assert lines == []
    else:
        assert [line.split(": test ELBO")[0] for line in lines] == [
            "[1/2] trace seed 0",
            "[2/2] iwae:2 seed 0",
        ]
        assert all(line.endswith(" s)") for line in lines)


@pytest.mark.parametrize("quiet", [False, True])
def test_ssl_shows_the_figures_bar_unless_quiet(bars, monkeypatch, tmp_path, quiet):
    from ppl_vae import fit_ssl

    _stderr(monkeypatch, _Terminal())
    fit_ssl(
        {"labels": 20, "epochs": 1, "max_train": 64, "hidden_dims": [8], "latent_dim": 2},
        out=tmp_path / "ssl",
        quiet=quiet,
    )
    (bar,) = [b for b in bars if b.what == "figures"]
    assert bar.shown is not quiet
    assert bar.total > 0 and bar.n == (0 if quiet else bar.total)  # a disabled bar counts nothing


@pytest.mark.parametrize("quiet", [False, True])
def test_plot_command_shows_the_figures_bar_unless_quiet(bars, monkeypatch, tmp_path, quiet):
    from ppl_vae.cli import main

    fit(out=tmp_path / "run", quiet=True, figures=False, **TINY)
    terminal = _stderr(monkeypatch, _Terminal())
    bars.clear()
    assert main(["plot", str(tmp_path / "run"), *(["--quiet"] if quiet else [])]) == 0
    (bar,) = [b for b in bars if b.what == "figures"]
    assert bar.shown is not quiet
    assert bar.total == 3  # traversals_z, posterior_z, kl_per_dimension
    assert bar.n == (0 if quiet else 3)  # a disabled bar counts nothing
    assert ("figures:" in terminal.getvalue()) is not quiet
