"""benchmarks/latent_structure_digits.py runs end to end: ``--quick``, one seed, two rows.

The printed Markdown table must hold exactly the requested rows, in order, with finite numbers;
the stacks' layer widths follow the docstring's rule (top 10, each layer below twice as wide).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "latent_structure_digits.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_latent_structure", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_layer_widths_double_below_the_top(bench):
    assert bench._stack(1) == []
    assert bench._stack(2) == [20]
    assert bench._stack(3) == [40, 20]
    assert bench.ROWS["ladder2"][1]["model_args"] == bench.ROWS["hierarchical2"][1]["model_args"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quick_run_prints_the_requested_rows_with_finite_numbers(bench, capsys):
    records = bench.main(["--quick", "--seeds", "0", "--rows", "gaussian,hierarchical2"])
    out = capsys.readouterr().out
    assert [(r["row"], r["seed"]) for r in records] == [("gaussian", 0), ("hierarchical2", 0)]
    for r in records:
        for key in ("test_log_likelihood", "test_elbo", "seconds_per_epoch"):
            assert math.isfinite(r[key]), (r["row"], key)
        assert r["test_log_likelihood"] < 0
    assert records[0]["active_units_per_site"].keys() == {"z"}
    assert records[1]["active_units_per_site"].keys() == {"z1", "z2"}
    assert records[1]["latent_dims_per_site"] == {"z1": 20, "z2": 10}

    header = (
        "| latent structure | test log p(x), nats | test ELBO, nats | active units | KL, nats "
        "| s / epoch |"
    )
    lines = out.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    assert [r[0] for r in rows] == [bench.ROWS["gaussian"][0], bench.ROWS["hierarchical2"][0]]
    for cells in rows:
        numbers = [float(x) for c in cells[1:] for x in re.findall(r"-?\d+\.\d+|-?\d+", c)]
        assert numbers and all(math.isfinite(v) for v in numbers), cells
        assert not re.search(r"nan|inf", " ".join(cells[1:]), re.IGNORECASE), cells
    assert re.fullmatch(r"\d+\.\d of 10", rows[0][3]), rows[0][3]
    assert re.fullmatch(r"\d+\.\d of 30 \(z1 \d+\.\d, z2 \d+\.\d\)", rows[1][3]), rows[1][3]
    assert re.fullmatch(r"-?\d+\.\d\d \(z1 -?\d+\.\d\d, z2 -?\d+\.\d\d\)", rows[1][4]), rows[1][4]
    assert len(rows[0]) == len(rows[1]) == 6
