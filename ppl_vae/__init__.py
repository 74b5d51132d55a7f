r"""ppl_vae: variational autoencoders written as Pyro model/guide pairs.

The generative model :math:`p(x \mid z)\,p(z)` and the amortised guide :math:`q(z \mid x)` are
Pyro programs (:class:`VAE` ``.model`` / ``.guide``); priors and likelihoods are swappable
modules (:mod:`ppl_vae.models`), encoders live in :mod:`ppl_vae.guides`.

Example:
    >>> from ppl_vae import fit
    >>> result = fit(epochs=2, quiet=True)  # doctest: +SKIP
"""

from .config import FitConfig
from .data import Dataset, load_data
from .inference.estimators import estimator_names, make_elbo
from .inference.scoring import score
from .models.errors import ConfigError
from .runs.compare import compare_estimators
from .runs.reopen import Run, evaluate, load_run
from .ssl import SSVAE, SSLConfig, build_ssvae, fit_ssl
from .train import FitResult, TrainingError, fit
from .vae import VAE, build_vae

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
