"""benchmarks/ssl_digits.py's tuning choice: the rule its docstring states, on made-up records.

Rule: the highest mean validation accuracy over seeds of the kept (best) epoch within a budget;
within 0.005 of it, the fewest epochs, then the higher mean, then grid order. Accuracies are
multiples of 1/144 held as float32, so two settings with the same number of correct points can
have means that differ in the last bits: that must still be a tie, broken by grid order.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SSL = Path(__file__).resolve().parents[1] / "benchmarks" / "ssl_digits.py"


@pytest.fixture(scope="module")
def ssl_digits():
    spec = importlib.util.spec_from_file_location("benchmark_ssl_digits", SSL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _acc(correct: int) -> float:
    return float(np.float32(correct / 144))


def _records(cfg: dict, per_seed: list[list[int]]) -> list[dict]:
    return [{"cfg": cfg, "seed": s, "val": [_acc(c) for c in v]} for s, v in enumerate(per_seed)]


def test_exact_tie_goes_to_grid_order_despite_float_rounding(ssl_digits):
    # 136 + 134 + 140 == 137 + 134 + 139 correct points: the same mean, different float sums.
    first = _records({"alpha": 10.0}, [[136], [134], [140]])
    second = _records({"alpha": 100.0}, [[137], [134], [139]])
    raw = [sum(_acc(c) for c in cs) / 3 for cs in ((136, 134, 140), (137, 134, 139))]
    assert raw[0] != raw[1]  # the float means differ in the last bits ...
    choice, _ = ssl_digits._choose(first + second, "t", (1,))
    assert choice == {"alpha": 10.0, "epochs": 1}  # ... and the first in grid order wins
    choice, _ = ssl_digits._choose(second + first, "t", (1,))
    assert choice == {"alpha": 100.0, "epochs": 1}


def test_cheaper_budget_within_half_a_point_and_best_epoch_read_off(ssl_digits):
    # One setting, budgets 1 and 2: the kept epoch is the best of the first E epochs.
    recs = _records({"lr": 1e-3}, [[130, 131], [130, 131], [130, 131]])
    # 131/144 - 130/144 = 0.0069 > 0.005: the longer budget wins.
    assert ssl_digits._choose(recs, "t", (1, 2))[0] == {"lr": 1e-3, "epochs": 2}
    recs = _records({"lr": 1e-3}, [[130, 131], [130, 130], [130, 130]])
    # mean difference 1/432 = 0.0023 <= 0.005: the cheaper budget wins.
    assert ssl_digits._choose(recs, "t", (1, 2))[0] == {"lr": 1e-3, "epochs": 1}
    # A later, worse epoch does not lower a budget's accuracy (best epoch kept).
    recs = _records({"lr": 1e-3}, [[131, 120], [131, 120], [131, 120]])
    _, table = ssl_digits._choose(recs, "t", (1, 2))
    assert table.count(f"| {_acc(131):.3f}") == 2
