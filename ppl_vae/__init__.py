r"""ppl_vae: variational autoencoders written as Pyro model/guide pairs.

The generative model :math:`p(x \mid z)\,p(z)` and the amortised guide :math:`q(z \mid x)` are
Pyro programs (:class:`VAE` ``.model`` / ``.guide``); priors and likelihoods are swappable
modules (:mod:`ppl_vae.models`), encoders live in :mod:`ppl_vae.guides`.

Example:
    >>> from ppl_vae import fit
    >>> result = fit(epochs=2, quiet=True)  # doctest: +SKIP
"""

import importlib
from typing import Any

#: Public name -> the module that defines it. Imported on first use (PEP 562), so that
#: ``import ppl_vae`` (and the ``ppl-vae`` command's start-up, which must answer SIGINT with
#: "interrupted") does not import torch and Pyro before they are needed.
_EXPORTS = {
    "FitConfig": ".config",
    "SSLConfig": ".ssl",
    "Dataset": ".data",
    "load_data": ".data",
    "estimator_names": ".inference.estimators",
    "make_elbo": ".inference.estimators",
    "score": ".inference.scoring",
    "ConfigError": ".models.errors",
    "compare_estimators": ".runs.compare",
    "Run": ".runs.reopen",
    "evaluate": ".runs.reopen",
    "load_run": ".runs.reopen",
    "SSVAE": ".ssl",
    "build_ssvae": ".ssl",
    "fit_ssl": ".ssl",
    "FitResult": ".train",
    "TrainingError": ".train",
    "fit": ".train",
    "VAE": ".vae",
    "build_vae": ".vae",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ppl_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [
    "SSVAE",
    "VAE",
    "ConfigError",
    "Dataset",
    "FitConfig",
    "FitResult",
    "Run",
    "SSLConfig",
    "TrainingError",
    "__version__",
    "build_ssvae",
    "build_vae",
    "compare_estimators",
    "estimator_names",
    "evaluate",
    "fit",
    "fit_ssl",
    "load_data",
    "load_run",
    "make_elbo",
    "score",
]
