"""Components are found by name, by file path or by module path; bad specs are named."""

from __future__ import annotations

import textwrap

import pytest

from ppl_vae import ConfigError, build_vae
from ppl_vae.components import available, build, resolve, spec_of
from ppl_vae.models.priors.base import Prior
from ppl_vae.models.priors.gaussian import GaussianPrior

LAPLACE = textwrap.dedent(
    """
    import pyro.distributions as dist
    import torch
    from ppl_vae.models.priors.base import Prior

    class LaplacePrior(Prior):
        def __init__(self, latent_dim, scale=1.0):
            super().__init__(latent_dim)
            self.register_buffer("scale", torch.full((latent_dim,), float(scale)))

        def forward(self):
            return dist.Laplace(torch.zeros_like(self.scale), self.scale).to_event(1)
    """
)


def test_names_resolve_to_the_single_subclass_of_the_module():
    assert "gaussian" in available("prior")
    assert {"bernoulli", "normal"} <= set(available("likelihood"))
    assert resolve("gaussian", "prior") is GaussianPrior
    assert spec_of(GaussianPrior(2), "prior") == "gaussian"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match=r"Unknown prior 'gausian'; expected one of \[.*'gaussian'"
    ):
        resolve("gausian", "prior")


def test_user_file_and_module_specs(tmp_path):
    path = tmp_path / "my_prior.py"
    path.write_text(LAPLACE)
    cls = resolve(f"{path}:LaplacePrior", "prior")
    assert issubclass(cls, Prior)
    vae = build_vae((64,), prior=f"{path}:LaplacePrior", prior_args={"scale": 2.0}, latent_dim=3)
    assert type(vae.encode(__import__("torch").rand(2, 64)).base_dist).__name__ == "Laplace"
    assert spec_of(vae.prior, "prior") == f"{path}:LaplacePrior"
    assert resolve("ppl_vae.models.priors.gaussian:GaussianPrior", "prior") is GaussianPrior


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/nonexistent/file.py:Foo", "does not exist"),
        ("ppl_vae.no_such_module:Foo", "cannot import module"),
        ("ppl_vae.models.priors.gaussian:Nope", "has no class 'Nope'"),
        ("ppl_vae.models.likelihoods.normal:NormalLikelihood", "must be a subclass"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve(spec, "prior")


def test_user_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match=r"importing .* failed: RuntimeError: boom"):
        resolve(f"{path}:X", "prior")


def test_prior_without_forward_fails_at_construction(tmp_path):
    path = tmp_path / "noforward.py"
    path.write_text(
        "from ppl_vae.models.priors.base import Prior\nclass NoForwardPrior(Prior):\n    pass\n"
    )
    with pytest.raises(ConfigError, match="must define forward"):
        build(f"{path}:NoForwardPrior", "prior", {"latent_dim": 2}, {})


def test_prior_with_wrong_event_shape_fails_at_construction(tmp_path):
    path = tmp_path / "wrongshape.py"
    path.write_text(LAPLACE.replace("torch.full((latent_dim,)", "torch.full((latent_dim + 1,)"))
    with pytest.raises(ConfigError, match=r"event shape \(4,\) but latent_dim=3"):
        build_vae((64,), prior=f"{path}:LaplacePrior", latent_dim=3)


def test_unknown_and_missing_options():
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['nope'\]"):
        build("gaussian", "prior", {"latent_dim": 2}, {"nope": 1})
    with pytest.raises(ConfigError, match="`latent_dim` must be a positive integer, got 0"):
        build("gaussian", "prior", {"latent_dim": 0}, {})
