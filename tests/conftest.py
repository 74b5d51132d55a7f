"""Shared fixtures: a clean Pyro state, validation on and a fixed seed for every test.

Run the suite on a GPU with ``pytest --device cuda``; tests that need CUDA skip without it.
"""

from __future__ import annotations

import os

import pyro
import pytest
import torch

# Small networks: one intra-op thread is as fast as two here, and spinning threads steal the
# core other processes need. OMP_NUM_THREADS, when set, wins.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device for tests that take one"
    )


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda given but CUDA is not available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True), pyro.settings.context(module_local_params=True):
        yield
    pyro.clear_param_store()
