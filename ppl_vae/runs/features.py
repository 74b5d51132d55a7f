r"""M1 features for M2 (Kingma et al. 2014's M1+M2): a trained VAE run's codes as a data set.

The M1 model is a VAE trained on the images; M2 is then trained on its latent codes
:math:`z_1 \sim q(z_1 \mid x)` instead of the pixels. :func:`feature_dataset` reopens the VAE run
(:func:`~ppl_vae.runs.reopen.load_run`: its split, its best-validation weights) and maps every
point of its train, validation and test splits to

- ``mode="mean"``: the posterior mean :math:`\mathbb{E}_q[z_1 \mid x]` (deterministic), or
- ``mode="sample"``: one exact draw :math:`z_1 \sim q(z_1 \mid x)` per point, from a generator
  seeded by ``seed`` (so a rebuilt run gets the same features),

keeping the labels and the split, so the test points M2 is scored on are test points M1 never
trained on. The codes are continuous vectors ``(D_1,)``; M2's ``likelihood="auto"`` is then a
Normal.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..data import Dataset
from ..models.errors import ConfigError

__all__ = ["FEATURE_MODES", "feature_dataset"]

FEATURE_MODES = ("mean", "sample")


@torch.no_grad()
def feature_dataset(
    run_dir: str | Path, mode: str = "mean", seed: int = 0, batch_size: int = 1024
) -> Dataset:
    """The VAE run's data set with every point replaced by its code (see the module docstring).

    Raises:
        ConfigError: no such run, a run that is not of kind ``vae``, data without labels, or an
            unknown ``mode``.
    """
    from .reopen import load_run

    if mode not in FEATURE_MODES:
        raise ConfigError(f"`features_mode` must be one of {list(FEATURE_MODES)}, got {mode!r}")
    run = load_run(run_dir, device="cpu")
    if run.kind != "vae":
        raise ConfigError(
            f"features come from a VAE run (ppl-vae fit), but {str(run_dir)!r} is of kind "
            f"{run.kind!r}"
        )
    ds = run.dataset
    if ds.train_y is None:
        raise ConfigError(
            f"the features run {str(run_dir)!r} was trained on data without labels "
            f"({ds.name!r}); M2 needs the labels of the same points"
        )
    vae = run.vae.eval()
    gen = torch.Generator().manual_seed(seed)

    def codes(x: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            if mode == "mean":
                out.append(vae.posterior_mean(xb))
            else:
                with torch.random.fork_rng():
                    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
                    out.append(vae.codes(xb))
        return torch.cat(out).float() if out else x.new_zeros(0, vae.latent_dim)

    d = vae.latent_dim
    return replace(
        ds,
        name=f"{ds.name} codes",
        train_x=codes(ds.train_x),
        val_x=codes(ds.val_x),
        test_x=codes(ds.test_x),
        data_shape=(d,),
        image_shape=None,
        num_levels=None,
        binarized="none",
        source=f"{mode} codes of q(z|x) of the VAE run {run_dir!s}",
    )
