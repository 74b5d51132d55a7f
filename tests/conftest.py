"""Shared fixtures: a clean Pyro state, validation on and a fixed seed for every test.

Run the suite on a GPU with ``pytest --device cuda``; tests that need CUDA skip without it.
"""

from __future__ import annotations

import os

import pyro
import pytest
import torch


def _sibling_packages_from_this_tree() -> None:
    """``ppl_vae.models`` and ``ppl_vae.guides`` live beside ``ppl_vae/`` (pyproject's
    ``package-dir``), and the editable install maps them to the checkout it was made from.

    Mutation testing (``mutmut run``, pyproject's ``[tool.mutmut]``) runs this suite on a mutated
    copy of the tree in ``mutants/``, with ``mutants/`` first on ``sys.path``, and it names the
    mutants of ``models/distributions/x.py`` after the module ``models.distributions.x``. So
    there, the two packages come from the copy, and ``ppl_vae.models.distributions.x`` (with
    ``ppl_vae.models.errors``, which it imports) is made the very module object
    ``models.distributions.x`` of the copy: the mutants are imported, and their names match.
    Outside ``mutants/`` this does nothing. (Run the suite inside ``mutants/`` by hand with
    ``cd mutants && python -m pytest tests/FILE.py``.)"""
    import importlib
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if root.name != "mutants":
        return
    folders = {"ppl_vae.models": root / "models", "ppl_vae.guides": root / "guides"}
    aliased = ("ppl_vae.models.distributions", "ppl_vae.models.errors")

    class _Tree(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name in folders:
                init = folders[name] / "__init__.py"
                return importlib.util.spec_from_file_location(
                    name, init, submodule_search_locations=[str(folders[name])]
                )
            if any(name == a or name.startswith(a + ".") for a in aliased):
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            module = importlib.import_module(spec.name.removeprefix("ppl_vae."))
            module.__dict__.setdefault("__own_spec__", module.__spec__)
            return module

        def exec_module(self, module):
            # importlib kept the module's __name__ and __package__ (models.x) but gave it the
            # alias's __spec__: give its own back, or its relative imports see two parents
            module.__spec__ = module.__own_spec__

    sys.meta_path.insert(0, _Tree())
    already = sorted(n for n in sys.modules if n.startswith(("ppl_vae.models", "ppl_vae.guides")))
    if already:  # imported from the editable install's tree before this file ran
        raise RuntimeError(f"mutation testing: {already[0]} was imported before tests/conftest.py")


_sibling_packages_from_this_tree()

# Small networks: one intra-op thread is as fast as two here, and spinning threads steal the
# core other processes need. OMP_NUM_THREADS, when set, wins.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", default="cpu", choices=("cpu", "cuda"), help="device for tests that take one"
    )
    parser.addoption(
        "--device-only",
        action="store_true",
        help="run only the tests that take the device fixture (the GPU checks with --device cuda)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--device-only"):
        return
    keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


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
