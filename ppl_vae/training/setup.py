r"""Getting data and device ready for training: the device choice and the data checks."""

from __future__ import annotations

from typing import Any

import torch

from ..data import Dataset
from ..models.errors import ConfigError

__all__ = ["initialize_from_data", "prepare_data", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def prepare_data(
    ds: Dataset, vae: Any, binarize: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Resolve ``auto`` binarisation and check every split against the likelihood's support.

    A module without a ``likelihood`` attribute (a user's own pair) is binarised only when asked
    (``binarize="dynamic"``; ``auto`` leaves its data as they are), and checked by its
    ``check_input`` if it has one; a pair that holds a likelihood (one that asked the engine for
    it) is treated as the VAE is.
    """
    lik = getattr(vae, "likelihood", None)
    if lik is None:
        return _prepare_plain(ds, vae, binarize, seed)
    needs_binary = lik.support is torch.distributions.constraints.boolean
    dynamic = binarize == "dynamic" or (
        binarize == "auto" and needs_binary and not is_binary(ds.train_x)
    )
    train, val, test = ds.train_x, ds.val_x, ds.test_x
    check = getattr(vae, "check_input", None)
    for x in (train, val, test):
        if callable(check):
            check(x)
        elif x.shape[1:] != tuple(lik.data_shape):  # a pair holding a likelihood of its own
            raise ConfigError(
                f"data have shape {tuple(x.shape)} but the likelihood was built for "
                f"(N, {', '.join(map(str, lik.data_shape))})"
            )
    if dynamic:
        if not bool(((train >= 0) & (train <= 1)).all()):
            raise ConfigError(
                "dynamic binarisation needs data in [0, 1], got values in "
                f"[{float(train.min()):.4g}, {float(train.max()):.4g}]"
            )
        # Evaluation data are binarised once, reproducibly, from their own generator.
        g = torch.Generator().manual_seed(seed + 1)
        val = torch.bernoulli(val.cpu(), generator=g).to(val.device)
        test = torch.bernoulli(test.cpu(), generator=g).to(test.device)
    else:
        lik.check_data(train, "training data")
    lik.check_data(val, "validation data")
    lik.check_data(test, "test data")
    return train, val, test, dynamic


def _prepare_plain(
    ds: Dataset, module: Any, binarize: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    train, val, test = ds.train_x, ds.val_x, ds.test_x
    check = getattr(module, "check_input", None)
    for x in (train, val, test):
        if callable(check):
            check(x)
    dynamic = binarize == "dynamic"
    if dynamic:
        if not bool(((train >= 0) & (train <= 1)).all()):
            raise ConfigError(
                "dynamic binarisation needs data in [0, 1], got values in "
                f"[{float(train.min()):.4g}, {float(train.max()):.4g}]"
            )
        g = torch.Generator().manual_seed(seed + 1)
        val = torch.bernoulli(val.cpu(), generator=g).to(val.device)
        test = torch.bernoulli(test.cpu(), generator=g).to(test.device)
    return train, val, test, dynamic


def initialize_from_data(module: torch.nn.Module, train_x: torch.Tensor) -> None:
    """Let every component that sets its initial values from the data do so (fresh runs only).

    A component opts in with a method ``initialize_from_data(x)`` (e.g. a likelihood whose
    learned scale starts at the training data's spread); it is called once, on the training
    split, before the optimiser sees the parameters. Resumed runs and reopened run directories
    load their trained values instead and never call it.
    """
    for m in module.modules():
        init = getattr(m, "initialize_from_data", None)
        if m is not module and callable(init):
            init(train_x)
