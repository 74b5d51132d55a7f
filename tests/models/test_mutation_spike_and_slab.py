"""Spike-and-slab (``models/distributions/spike_and_slab.py``) where the mutation run of
2026-12-02 (second pass) found it unchecked: the default slab N(0, 1), the relaxed gate's
temperature kept as a copy in the slab's dtype, the geometric annealing schedule at an
interior point, and the messages a user reads."""

from __future__ import annotations

import math

import pytest
import torch

from ppl_vae.models.distributions.spike_and_slab import (
    PARTS_ATTR,
    RelaxedSpikeAndSlab,
    SpikeAndSlab,
    SpikeAndSlabFamily,
)
from ppl_vae.models.errors import ConfigError


@pytest.mark.parametrize("make", [lambda: SpikeAndSlab(gate_probs=0.3),
                                  lambda: RelaxedSpikeAndSlab(0.5, gate_probs=0.3)])  # fmt: skip
def test_the_default_slab_is_a_standard_normal(make):
    d = make()
    assert float(d.loc) == 0.0 and float(d.scale) == 1.0
    # at an "on" value the exact density is log(0.3) + log N(0.7; 0, 1)
    exact = d.exact() if isinstance(d, RelaxedSpikeAndSlab) else d
    by_hand = math.log(0.3) - 0.5 * 0.7**2 - 0.5 * math.log(2 * math.pi)
    assert float(exact.log_prob(torch.tensor(0.7))) == pytest.approx(by_hand, rel=1e-6)


def test_the_relaxed_temperature_is_a_copy_in_the_slabs_dtype():
    loc = torch.zeros(3, dtype=torch.float64)
    logits = torch.zeros(3, dtype=torch.float64)
    d = RelaxedSpikeAndSlab(torch.tensor(0.5), gate_logits=logits, loc=loc)
    assert d.temperature.dtype == torch.float64  # a float32 temperature follows the slab
    t = torch.tensor(0.5, dtype=torch.float64)  # already in the slab's dtype: still copied
    d = RelaxedSpikeAndSlab(t, gate_logits=logits, loc=loc)
    t.fill_(2.0)  # the family anneals its buffer in place: the distribution keeps its own value
    assert float(d.temperature) == 0.5


def test_annealing_is_geometric_between_the_two_temperatures():
    fam = SpikeAndSlabFamily(initial_temperature=2.0, final_temperature=0.5)
    fam.anneal(0.5)  # T0 (T1 / T0)^p = 2 * 0.25^0.5
    assert float(fam.temperature) == pytest.approx(1.0, rel=1e-6)
    fam.anneal(1.0)
    assert float(fam.temperature) == pytest.approx(0.5, rel=1e-6)


def test_exactly_one_gate_parameterisation_is_required_by_name():
    with pytest.raises(ConfigError) as err:
        SpikeAndSlab(gate_probs=0.3, gate_logits=0.0)
    assert str(err.value) == (
        "SpikeAndSlab takes exactly one of `gate_probs` or `gate_logits`, got gate_probs=0.3, "
        "gate_logits=0.0"
    )


def test_relaxed_log_prob_off_its_draws_says_what_to_use_instead():
    d = RelaxedSpikeAndSlab(0.5, gate_probs=torch.full((2,), 0.3))
    draw = d.rsample()
    assert getattr(draw, PARTS_ATTR, None) is not None
    with pytest.raises(ConfigError) as err:
        d.log_prob(draw.detach().clone())
    assert str(err.value) == (
        "RelaxedSpikeAndSlab.log_prob is defined only at its own rsample() draws, which carry "
        f"the relaxed gate and slab (attribute `{PARTS_ATTR}`); got a tensor of shape (2,) "
        "without them (a detached or copied draw, as the sticking-the-landing and DReG "
        "estimators make?). Use the 'trace' or 'meanfield' estimator with this guide, or "
        ".exact().log_prob(value) for exact values"
    )


def test_the_latent_histogram_labels_its_two_slab_panels():
    d = SpikeAndSlab(gate_probs=0.3, loc=torch.tensor([0.5]), scale=torch.tensor([2.0]))
    first, loc, second, scale = d.histogram_parts()
    assert (first, second) == ("slab location", "slab scale")
    assert loc.tolist() == [0.5] and scale.tolist() == [2.0]
