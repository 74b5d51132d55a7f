"""benchmarks/m2_speed.py runs end to end (``--quick``): every case, every variant, finite ratios.

No timing thresholds: the smoke test only checks that the table has one row per case and label
guide, that every variant was timed in every round and that the fast path served ``ppl_vae``'s
steps and not the ``Pyro ELBOs`` variant's. The comparison is like for like: the hand-written
M2 trains its own copies of the same networks, and its loss estimates the kind's objective.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch

M2_SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "m2_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_m2_speed", M2_SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_run_prints_every_case_with_finite_ratios(bench, capsys) -> None:
    results = bench.main(["--quick"])
    out = capsys.readouterr().out
    cases = [(c, g) for c in bench.SHAPES for g in bench.GUIDES]
    assert [(r.case, r.guide) for r in results] == cases
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(cases)  # the header and one row per case
    for (case, guide), row in zip(cases, rows[1:], strict=True):
        assert row.startswith(f"| {case} | {guide} |")
    for r in results:
        for v in bench.VARIANTS:
            assert len(r.ms[v]) == len(r.cpu[v]) == 2  # two rounds
            if v != "hand":
                for cpu in (False, True):
                    assert math.isfinite(r.ratio(v, cpu=cpu)) and r.ratio(v, cpu=cpu) > 0
                    assert math.isfinite(r.paired(v, cpu=cpu)) and r.paired(v, cpu=cpu) > 0


def test_the_log_density_ablation_adds_its_variant(bench, capsys) -> None:
    results = bench.main(["--quick", "--cases", "64", "--guides", "relaxed", "--ablate-log-density"])
    assert set(results[0].ms) == {*bench.VARIANTS, bench.P_Z_DISTRIBUTION}
    assert f"{bench.P_Z_DISTRIBUTION} ÷ {bench.REFERENCE}" in capsys.readouterr().out
    assert math.isfinite(results[0].paired(bench.P_Z_DISTRIBUTION))


def test_the_variants_take_the_paths_they_name(bench) -> None:
    with pyro.settings.context(module_local_params=True):
        setup = bench.build_setup("64", "enumerate", torch.device("cpu"), 4, 10, num_batches=2)
        terms = setup.kind.terms
        bench.PplStep(setup, fast=True)()  # the probe
        bench.PplStep(setup, fast=True)()
        assert terms.steps == {"fast": 6, "pyro": 3}  # the probe: Pyro's, then fast
        bench.PplStep(setup, fast=False)()
        assert terms.steps == {"fast": 6, "pyro": 6}
        # --ablate-log-density: fast, with p(z) through its distribution, then back
        prior, calls = setup.kind.model.prior, []
        log_density = prior.log_density
        prior.log_density = lambda *a: calls.append(1) or log_density(*a)
        bench.PplStep(setup, fast=True, log_density=False)()
        assert terms.steps == {"fast": 9, "pyro": 6} and calls == []
        bench.PplStep(setup, fast=True)()
        assert terms.steps == {"fast": 12, "pyro": 6} and len(calls) == 2  # labelled, unlabelled
        hand = bench.HandStep(setup, "enumerate", fused=False)
        x_l, y_l, x_u, b_l, b_u = setup.batches[0]
        assert torch.isfinite(hand.m2.loss(x_l, y_l, x_u, b_l, b_u))
        # the hand-written M2 trains copies: the kind's parameters are not its parameters
        ids = {id(p) for p in setup.kind.model.parameters()}
        assert not ids & {id(p) for p in hand.m2.parameters()}


@pytest.mark.parametrize("guide", ["enumerate", "relaxed"])
def test_the_hand_written_m2_has_the_kinds_objective(bench, guide: str) -> None:
    """Like for like: from the same weights, the hand-written step loss (closed-form Gaussian
    KL) and ``M2Kind.loss`` (Monte Carlo log-density ratio) are unbiased estimates of the same
    objective. Their means over 200 draws agree within 5 standard errors (a false failure
    about once in 1.7 million runs); a wrong weight, a dropped term or the wrong class prior
    moves the mean by many nats."""
    with pyro.settings.context(module_local_params=True):
        setup = bench.build_setup("64", guide, torch.device("cpu"), 8, 10, num_batches=2)
        hand = bench.HandStep(setup, guide, fused=False).m2
        batch = setup.batches[0]
        kind = [float(setup.kind.loss(*batch).detach()) for _ in range(200)]
        mine = [float(hand.loss(*batch).detach()) for _ in range(200)]
    a, b = torch.tensor(kind, dtype=torch.float64), torch.tensor(mine, dtype=torch.float64)
    se = math.sqrt(float(a.var() / len(a) + b.var() / len(b)))
    assert abs(float(a.mean() - b.mean())) < 5 * se, (float(a.mean()), float(b.mean()), se)
