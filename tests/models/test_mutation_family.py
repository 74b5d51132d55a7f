"""Variational families (``models/distributions/family.py``) where the mutation run of
2026-12-02 (second pass) found them unchecked: which parameters a mirrored family learns
(preferred parameterisations, excluded and fixed ones), the temperature schedule's bounds, and
the exact messages a user reads when a prior cannot be mirrored."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from ppl_vae.models.distributions.family import (
    MirrorFamily,
    NormalOnSupport,
    check_temperatures,
    family_for,
)
from ppl_vae.models.errors import ConfigError


def _only(**arg_constraints):
    """A distribution class declaring just these parameters (a user's prior might)."""
    return type("Custom", (dist.Distribution,), {"arg_constraints": arg_constraints})


def test_of_two_parameterisations_the_preferred_one_is_learned():
    assert list(MirrorFamily(dist.Bernoulli).param_constraints) == ["logits"]  # both declared
    # one of the two declared: that one, whichever it is
    assert list(MirrorFamily(_only(probs=constraints.unit_interval)).param_constraints) == ["probs"]
    assert list(MirrorFamily(_only(logits=constraints.real)).param_constraints) == ["logits"]


def test_excluded_or_fixed_parameters_are_not_learned():
    assert list(MirrorFamily(dist.StudentT, exclude=("df",)).param_constraints) == ["loc", "scale"]
    fixed = MirrorFamily(dist.StudentT, fixed={"df": 3.0})
    assert list(fixed.param_constraints) == ["loc", "scale"]
    q = fixed.build(loc=torch.zeros(2), scale=torch.ones(2))
    assert q.base_dist.df.tolist() == [3.0, 3.0]
    assert repr(MirrorFamily(dist.Normal)) == "MirrorFamily(Normal(loc, scale))"


def test_a_parameter_without_a_bijection_is_refused_by_name():
    # Binomial's total_count is a non-negative integer: biject_to has nothing for it
    with pytest.raises(ConfigError) as err:
        MirrorFamily(dist.Binomial)
    assert str(err.value) == (
        f"cannot mirror Binomial: parameter `total_count` has constraint "
        f"{dist.Binomial.arg_constraints['total_count']} with no elementwise bijection; give the "
        "prior its own guide_family()"
    )


@pytest.mark.parametrize(
    ("cls", "name"),
    [(dist.MixtureSameFamily, "MixtureSameFamily"), (type("Plain", (), {}), "Plain")],
)
def test_a_class_with_no_parameters_to_mirror_is_refused(cls, name):
    with pytest.raises(ConfigError) as err:
        MirrorFamily(cls)
    assert str(err.value) == f"cannot mirror {name}: it declares no arg_constraints"


def test_the_encoder_width_message_names_the_outputs_and_the_need():
    fam = MirrorFamily(dist.Normal)
    with pytest.raises(ConfigError) as err:
        fam.constrain(torch.zeros(2, 3, 5), latent_dim=2)  # a batch of shape (2, 3)
    assert str(err.value) == (
        "encoder head produced 5 outputs but the variational family MirrorFamily needs 4 "
        "(2 x latent_dim=2)"
    )


def test_a_support_without_a_bijection_is_refused_by_name():
    support = constraints.integer_interval(0, 2)
    with pytest.raises(ConfigError) as err:
        NormalOnSupport(support)
    assert str(err.value) == f"no elementwise bijection onto the support {support}"
    d = dist.Categorical(logits=torch.zeros(3))
    with pytest.raises(ConfigError) as err:
        family_for(d, "MyPrior")
    text = str(err.value)
    assert text.startswith("prior MyPrior returns a Categorical, which cannot be mirrored (cannot")
    assert f"and whose support {support} has no elementwise bijection (" in text
    assert text.endswith(
        "; give MyPrior a guide_family() returning a VariationalFamily, e.g. "
        "MirrorFamily(dist.Normal)"
    )


def test_temperature_schedule_bounds():
    check_temperatures(1.0, 1.0)  # final == initial: a constant temperature is allowed
    check_temperatures(2.0, 0.5)
    with pytest.raises(
        ConfigError, match=r"^`initial_temperature` must be a positive number, got True$"
    ):
        check_temperatures(True, 0.5)
    with pytest.raises(ConfigError, match=r"^`final_temperature` must be at most"):
        check_temperatures(1.0, 1.5)


def test_raw_outputs_are_clamped_on_both_sides_before_the_bijection():
    fam = MirrorFamily(dist.Normal)  # loc: identity; scale: exp
    params = fam.constrain(torch.tensor([[-100.0, 100.0, -100.0, 100.0]]), latent_dim=2)
    assert params["loc"].tolist() == [[-15.0, 15.0]]
    torch.testing.assert_close(params["scale"], torch.tensor([[-15.0, 15.0]]).exp())
