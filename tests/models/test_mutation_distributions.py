"""Tests written to kill surviving mutants of ``models/distributions`` (mutmut, issue 17).

Each test checks an observable behaviour against an independent computation with a stated
tolerance: series coefficients derived from Bernoulli numbers in exact rational arithmetic,
closed forms evaluated by ``mpmath`` at 40 digits (installed with torch, through sympy),
quadrature by SciPy, and the docstrings' own formulas evaluated with Python floats. The
mutants each test kills are named in its docstring; equivalent mutants are listed in the
commit messages that added these tests.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from fractions import Fraction

import mpmath
import pyro
import pytest
import torch
from scipy import integrate, special
from torch.distributions import constraints

from ppl_vae.models.distributions.continuous_bernoulli import (
    TAYLOR_THRESHOLD,
    StableContinuousBernoulli,
    cb_icdf,
    cb_log_normalizer,
    cb_mean,
)
from ppl_vae.models.distributions.discretized_logistic import (
    GRID_TOLERANCE,
    DiscretizedLogistic,
    check_num_levels,
)
from ppl_vae.models.distributions.family import NormalOnSupport
from ppl_vae.models.distributions.normal import Normal
from ppl_vae.models.distributions.spike_and_slab import (
    PARTS_ATTR,
    RelaxedSpikeAndSlab,
    SpikeAndSlab,
)
from ppl_vae.models.distributions.von_mises import ReparameterizedVonMises, von_mises_cdf
from ppl_vae.models.errors import ConfigError

mpmath.mp.dps = 40
F64 = torch.float64


# -- continuous Bernoulli: the small-|logit| series ---------------------------------------------
def _bernoulli_numbers(n: int) -> list[Fraction]:
    """B_0 .. B_n exactly, from sum_{k<=m} C(m+1, k) B_k = 0."""
    b = [Fraction(1)]
    for m in range(1, n + 1):
        b.append(-sum(math.comb(m + 1, k) * b[k] for k in range(m)) / (m + 1))
    return b


_B = _bernoulli_numbers(8)
# eta / tanh(eta / 2): d/d eta log C = 1/eta - 1/sinh(eta), and
# eta / sinh(eta) = sum_n (2 - 4^n) B_2n eta^2n / (2n)!, so
# log C = log 2 + sum_{n>=1} (4^n - 2) B_2n eta^2n / (2n (2n)!);
# (eta/2) coth(eta/2) = sum_n B_2n eta^2n / (2n)!, so mean = 1/2 + sum_{n>=1} B_2n eta^(2n-1) / (2n)!.
_LOG_C_COEFFS = [(4**n - 2) * _B[2 * n] / (2 * n * math.factorial(2 * n)) for n in (1, 2, 3)]
_MEAN_COEFFS = [_B[2 * n] / math.factorial(2 * n) for n in (1, 2, 3)]
# Just below the switch to the direct forms, where the truncated terms are largest.
SMALL_LOGITS = [0.0999, -0.0999, 0.07, -0.05]


def test_series_coefficients_are_the_documented_ones() -> None:
    # The derivation above reproduces the docstrings' series (a check of the reference itself).
    assert _LOG_C_COEFFS == [Fraction(1, 12), Fraction(-7, 1440), Fraction(31, 90720)]
    assert _MEAN_COEFFS == [Fraction(1, 12), Fraction(-1, 720), Fraction(1, 30240)]


@pytest.mark.parametrize("eta", SMALL_LOGITS)
def test_cb_taylor_branches_are_the_degree_6_series(eta: float) -> None:
    """The Taylor branches of ``cb_log_normalizer`` and ``cb_mean`` in float64 equal the
    truncated series (exact rational coefficients, evaluated exactly at the float64 logit) to
    1e-15 absolute: a Horner evaluation of values below 1 rounds to a few 1e-16. A 1e-5
    relative change of the last coefficient moves the result by ~4e-15 at |eta| = 0.1.

    Kills cb_log_normalizer 32, 33 (31/90720 -> 32/90720, 31/90721) and cb_mean 25, 28, 31, 32.
    """
    assert abs(eta) < TAYLOR_THRESHOLD
    e = Fraction(eta)
    log_c = Fraction(math.log(2.0)) + sum(c * e ** (2 * n) for n, c in enumerate(_LOG_C_COEFFS, 1))
    mean = Fraction(1, 2) + sum(c * e ** (2 * n - 1) for n, c in enumerate(_MEAN_COEFFS, 1))
    t = torch.tensor([eta], dtype=F64)
    assert abs(float(cb_log_normalizer(t)) - float(log_c)) < 1e-15
    assert abs(float(cb_mean(t)) - float(mean)) < 1e-15


@pytest.mark.parametrize("eta", SMALL_LOGITS)
def test_cb_taylor_branches_match_the_closed_forms(eta: float) -> None:
    """...and the closed forms log(eta / tanh(eta/2)) and 1/2 + 1/(2 tanh(eta/2)) - 1/eta at 40
    digits to 1e-12 absolute, the truncation error the module documents (observed 2.6e-13 and
    8.2e-14 at |eta| = 0.0999)."""
    e = mpmath.mpf(eta)
    log_c = mpmath.log(e / mpmath.tanh(e / 2))
    mean = mpmath.mpf(1) / 2 + 1 / (2 * mpmath.tanh(e / 2)) - 1 / e
    t = torch.tensor([eta], dtype=F64)
    assert abs(float(cb_log_normalizer(t)) - float(log_c)) < 1e-12
    assert abs(float(cb_mean(t)) - float(mean)) < 1e-12


@pytest.mark.parametrize("eta", [9.99e-4, -9.99e-4, 5e-4, -2e-4])
def test_cb_icdf_series_branch_matches_the_closed_form(eta: float) -> None:
    """``cb_icdf``'s series (|eta| < 1e-3) against log1p(u expm1(eta)) / eta at 40 digits, to
    1e-10 absolute in float64: its truncation error is O(eta^3) (2.3e-12 observed at
    |eta| = 1e-3), while each altered eta^2 coefficient moves the result by at least 2e-9 at
    these u.

    Kills cb_icdf 43, 47, 48, 50, 51.
    """
    us = [0.1, 0.25, 0.4, 0.75, 0.9]
    e = mpmath.mpf(eta)
    ref = [float(mpmath.log1p(mpmath.mpf(u) * mpmath.expm1(e)) / e) for u in us]
    got = cb_icdf(torch.full((len(us),), eta, dtype=F64), torch.tensor(us, dtype=F64))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), atol=1e-10, rtol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cb_icdf_maps_the_unit_interval_onto_itself(dtype: torch.dtype) -> None:
    """F^{-1}(0) = 0 and F^{-1}(1) = 1 (to 1e-15, rounding: 2.2e-16 is seen at eta = 5) and
    F^{-1}(u) in [0, 1], for every logit: at |eta| >= 37 (float64) expm1(-|eta|) rounds to -1
    and the direct form gives +inf or 1 - inf at an end point, which the clamp must catch.

    Kills cb_icdf 52, 53, 55, 63 (the clamp's bounds dropped or moved to 2).
    """
    logits = torch.tensor([-80.0, -50.0, -5.0, -0.5, 0.0, 1e-4, 0.5, 5.0, 50.0, 80.0], dtype=dtype)
    ends = cb_icdf(
        logits[:, None].expand(-1, 2), torch.tensor([0.0, 1.0], dtype=dtype).expand(10, 2)
    )
    want = torch.tensor([0.0, 1.0], dtype=dtype).expand(10, 2)
    torch.testing.assert_close(ends, want, atol=1e-15, rtol=0.0)
    u = torch.linspace(0.0, 1.0, 201, dtype=dtype)[:, None].expand(-1, 10)
    x = cb_icdf(logits.expand(201, -1), u)
    assert bool(((x >= 0) & (x <= 1)).all())


# -- validate_args and expand, for every distribution of the package ---------------------------
NAN = float("nan")


def _with_parts(value: torch.Tensor, gate: float) -> torch.Tensor:
    """A value carrying relaxed (gate, slab) draws, as RelaxedSpikeAndSlab.rsample makes."""
    setattr(value, PARTS_ATTR, (torch.full_like(value, gate), value / gate))
    return value


# name: (class, parameters (NaN in the first element when ``bad``), a valid value, a value
# outside the support); batch shape (2,).
CATALOGUE = {
    "continuous_bernoulli": (
        StableContinuousBernoulli,
        lambda bad: {"logits": torch.tensor([NAN if bad else 0.3, -2.0])},
        lambda shape: torch.full(shape, 0.3),
        lambda shape: torch.full(shape, 1.5),
    ),
    "discretized_logistic": (
        DiscretizedLogistic,
        lambda bad: {
            "loc": torch.tensor([NAN if bad else 0.5, 0.2]),
            "scale": torch.tensor([0.1, 0.3]),
            "num_levels": 17,
        },
        lambda shape: torch.full(shape, 0.5),
        lambda shape: torch.full(shape, 0.03),  # between levels 0 and 1/16
    ),
    "von_mises": (
        ReparameterizedVonMises,
        lambda bad: {
            "loc": torch.tensor([NAN if bad else 0.5, 0.2]),
            "concentration": torch.tensor([1.0, 2.0]),
        },
        lambda shape: torch.full(shape, 0.1),
        lambda shape: torch.full(shape, NAN),
    ),
    "spike_and_slab": (
        SpikeAndSlab,
        lambda bad: {
            "gate_logits": torch.tensor([0.0, 1.0]),
            "loc": torch.tensor([NAN if bad else 0.5, 0.2]),
            "scale": torch.tensor([1.0, 2.0]),
        },
        lambda shape: torch.full(shape, 0.7),
        lambda shape: torch.full(shape, NAN),
    ),
    "relaxed_spike_and_slab": (
        RelaxedSpikeAndSlab,
        lambda bad: {
            "temperature": 0.5,
            "gate_logits": torch.tensor([0.0, 1.0]),
            "loc": torch.tensor([NAN if bad else 0.5, 0.2]),
            "scale": torch.tensor([1.0, 2.0]),
        },
        lambda shape: _with_parts(torch.full(shape, 0.7), 0.9),
        lambda shape: _with_parts(torch.full(shape, NAN), 0.9),
    ),
}


def _rejects(d: torch.distributions.Distribution, value: torch.Tensor) -> bool:
    try:
        d.log_prob(value)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_validate_args_argument_wins_over_the_global_setting(name: str) -> None:
    """``validate_args=True`` rejects a value outside the support with Pyro's validation off,
    ``validate_args=False`` accepts it with validation on, and ``expand`` keeps the choice.

    Kills StableContinuousBernoulli.__init__ 4, 6 (validate_args dropped) and expand 19,
    DiscretizedLogistic.expand 28 (``_validate_args`` not copied).
    """
    cls, params, _, bad_value = CATALOGUE[name]
    with pyro.validation_enabled(False):
        d = cls(**params(False), validate_args=True)
        assert _rejects(d, bad_value((2,)))
        assert _rejects(d.expand((3, 2)), bad_value((3, 2)))
    with pyro.validation_enabled(True):
        d = cls(**params(False), validate_args=False)
        assert not _rejects(d, bad_value((2,)))
        assert not _rejects(d.expand((3, 2)), bad_value((3, 2)))


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_expand_does_not_validate_what_was_not_validated(name: str) -> None:
    """A distribution made with ``validate_args=False`` around a NaN parameter expands without
    error with Pyro's validation on, and keeps the NaN where it was.

    Kills StableContinuousBernoulli.expand 11, 13, 18 and DiscretizedLogistic.expand 20, 22, 27
    (``validate_args=False`` -> None / True in the parent's ``__init__``).
    """
    cls, params, _, _ = CATALOGUE[name]
    e = cls(**params(True), validate_args=False).expand((3, 2))
    assert e.batch_shape == (3, 2)
    nan_param = next(n for n, v in params(True).items() if torch.is_tensor(v) and v.isnan().any())
    value = getattr(e, nan_param)
    assert bool(value[:, 0].isnan().all()) and not bool(value[:, 1].isnan().any())


def _tagged(cls: type) -> type:
    """A subclass with its own ``__init__``, expanding through the parent (torch's pattern)."""

    class Tagged(cls):
        def __init__(self, tag: str, **kwargs) -> None:
            self.tag = tag
            super().__init__(**kwargs)

        def expand(self, batch_shape, _instance=None):
            new = self._get_checked_instance(Tagged, _instance)
            new.tag = self.tag
            return super().expand(batch_shape, _instance=new)

    return Tagged


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_expand_fills_the_subclass_instance_it_is_given(name: str) -> None:
    """The expanded subclass instance keeps its type and attributes and scores a value as the
    original does, broadcast (float32, 1e-6).

    Kills StableContinuousBernoulli.expand 3, 5 and DiscretizedLogistic.expand 3, 5 (``_instance``
    ignored: torch then raises NotImplementedError for a subclass with its own ``__init__``).
    """
    cls, params, valid_value, _ = CATALOGUE[name]
    tagged = _tagged(cls)
    d = tagged(tag="t", **params(False))
    e = d.expand((4, 2))
    assert type(e) is tagged and e.tag == "t" and e.batch_shape == (4, 2)
    want = d.log_prob(valid_value((2,))).expand(4, 2)
    torch.testing.assert_close(e.log_prob(valid_value((4, 2))), want, atol=1e-6, rtol=0.0)


# -- discretised logistic -----------------------------------------------------------------------
def test_discretized_logistic_enumerate_support_is_the_grid_broadcast_over_the_batch() -> None:
    """``enumerate_support()`` is ``(K, *batch)`` with entry ``k / (K - 1)`` (exact for K = 5);
    ``expand=False`` leaves singleton batch dimensions.

    Kills DiscretizedLogistic.enumerate_support 1, 9, 10, 11, 12.
    """
    d = DiscretizedLogistic(torch.zeros(2, 3), torch.ones(2, 3), num_levels=5)
    grid = torch.tensor([k / 4 for k in range(5)])
    values = d.enumerate_support()
    assert values.shape == (5, 2, 3)
    assert torch.equal(values, grid[:, None, None].expand(5, 2, 3))
    assert torch.equal(d.enumerate_support(expand=False), grid[:, None, None])


def test_discretized_logistic_validation_error_names_the_grid() -> None:
    """An off-grid value is rejected with a message naming the support and its K.

    Kills QuantizedUnitInterval.__repr__ 1 (``type(None).__name__``).
    """
    d = DiscretizedLogistic(torch.tensor([0.5]), torch.tensor([0.1]), num_levels=17)
    with pytest.raises(ValueError, match=r"support \(QuantizedUnitInterval\(num_levels=17\)\)"):
        d.log_prob(torch.tensor([0.03]))


def test_discretized_logistic_support_tolerance_is_inclusive() -> None:
    """A value exactly GRID_TOLERANCE from a level counts as on the grid (the constant's
    documented meaning: how far a value "may be from the grid and still count as on it");
    1.5 times that does not. float64, where 0 + 1e-4 is exactly the tolerance.

    Kills QuantizedUnitInterval.check 13 (``<=`` -> ``<``).
    """
    d = DiscretizedLogistic(torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64), num_levels=5)
    value = torch.tensor([GRID_TOLERANCE, 1.5 * GRID_TOLERANCE], dtype=F64)
    assert d.support.check(value).tolist() == [True, False]


def _logistic_bin_log_mass(x: float, loc: float, scale: float, levels: int) -> float:
    """log(sigma((x + h - loc)/s) - sigma((x - h - loc)/s)) for an interior level, Python floats."""
    h = 0.5 / (levels - 1)
    sig = lambda t: 1.0 / (1.0 + math.exp(-t))  # noqa: E731
    return math.log(sig((x + h - loc) / scale) - sig((x - h - loc) / scale))


_ROW, _ROWS = [0.2, 0.5, 0.7], [[0.2, 0.5, 0.7], [0.3, 0.45, 0.6]]
_SROW, _SROWS = [0.1, 0.2, 0.3], [[0.1, 0.2, 0.3], [0.3, 0.25, 0.15]]


@pytest.mark.parametrize(("loc", "scale"), [(_ROWS, _SROW), (_ROW, _SROWS), (_ROWS, _SROWS)])
def test_discretized_logistic_broadcasts_loc_and_scale(loc: list, scale: list) -> None:
    """One component: batch shape is the broadcast of loc and scale, parameters are stored as
    ``(*batch, 1)`` and log P(x) is the logistic bin mass (Python floats, 1e-12, float64).

    Kills DiscretizedLogistic.__init__ 7, 8, 9, 10, 11.
    """
    loc_t, scale_t = torch.tensor(loc, dtype=F64), torch.tensor(scale, dtype=F64)
    d = DiscretizedLogistic(loc_t, scale_t, num_levels=17)
    assert d.batch_shape == (2, 3) and d.num_mixtures == 1
    assert d.loc.shape == d.scale.shape == d.mixture_logits.shape == (2, 3, 1)
    m, s = torch.broadcast_tensors(loc_t, scale_t)
    ref = [[_logistic_bin_log_mass(0.5, mu, sd, 17) for mu, sd in zip(*r)] for r in zip(m, s)]
    got = d.log_prob(torch.full((2, 3), 0.5, dtype=F64))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("big", ["loc", "scale", "mixture_logits"])
def test_discretized_logistic_mixture_broadcasts_its_arguments(big: str) -> None:
    """A 3-component mixture where one argument carries the batch dimension: batch shape (2,)
    and log P(x) = log sum_m pi_m P_m(x) in Python floats (1e-12, float64).

    Kills DiscretizedLogistic.__init__ 27, 28.
    """
    args = {"loc": _ROW, "scale": _SROW, "mixture_logits": [0.0, 1.0, -0.5]}
    rows = {"loc": _ROWS, "scale": _SROWS, "mixture_logits": [[0.0, 1.0, -0.5], [0.3, -1.0, 0.2]]}
    args[big] = rows[big]
    t = {k: torch.tensor(v, dtype=F64) for k, v in args.items()}
    d = DiscretizedLogistic(t["loc"], t["scale"], num_levels=17, mixture_logits=t["mixture_logits"])
    assert d.batch_shape == (2,) and d.num_mixtures == 3
    ref = []
    for b in range(2):
        mu, sd, w = (torch.broadcast_to(t[k], (2, 3))[b].tolist() for k in t)
        z = sum(math.exp(v) for v in w)
        ref.append(
            math.log(
                sum(
                    math.exp(wi) / z * math.exp(_logistic_bin_log_mass(0.5, mi, si, 17))
                    for mi, si, wi in zip(mu, sd, w)
                )
            )
        )
    got = d.log_prob(torch.full((2,), 0.5, dtype=F64))
    torch.testing.assert_close(got, torch.tensor(ref, dtype=F64), rtol=1e-12, atol=0.0)


def test_discretized_logistic_rejects_scalar_mixture_logits_and_defaults_to_8_bits() -> None:
    """A scalar ``mixture_logits`` is rejected with a message naming it; without
    ``num_levels`` the grid is the 256 levels k / 255 of 8-bit data.

    Kills DiscretizedLogistic.__init__ 1 (default 257), 22, 23, 24, 25.
    """
    msg = r"^`mixture_logits` must have the component dimension last, got a scalar$"
    with pytest.raises(ConfigError, match=msg):
        DiscretizedLogistic(torch.zeros(2), torch.ones(2), mixture_logits=torch.tensor(0.0))
    one = DiscretizedLogistic(
        torch.tensor(_ROW), torch.tensor(_SROW), 17, mixture_logits=torch.tensor([0.0, 1.0, -0.5])
    )  # a 1-D mixture_logits: one batch element's components
    assert one.batch_shape == () and one.num_mixtures == 3
    d = DiscretizedLogistic(torch.tensor(0.5), torch.tensor(0.1))
    assert d.num_levels == 256
    torch.testing.assert_close(
        d.enumerate_support(), torch.tensor([k / 255 for k in range(256)]), atol=0.0, rtol=0.0
    )


@pytest.mark.parametrize("bad", [2.5, "abc", [17], True, 1, 0.0])
def test_check_num_levels_rejects_what_is_not_an_integer_of_at_least_2(bad: object) -> None:
    """Kills check_num_levels 9 (2.5 accepted as 2) and 10 ("abc" reaches ``int()``)."""
    with pytest.raises(ConfigError, match=r"^`num_levels` must be an integer >= 2, got "):
        check_num_levels(bad)
    assert check_num_levels(17.0) == 17 and check_num_levels(2) == 2


def test_check_num_levels_explains_a_missing_number_of_levels() -> None:
    """Kills check_num_levels 3, 6, 7 (the message for None)."""
    msg = (
        "`num_levels` must be an integer >= 2, got None (the data set does not say how many "
        "levels its values take: pass num_levels, or use a continuous likelihood)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(msg)}$"):
        check_num_levels(None)


def test_discretized_logistic_grid_is_on_the_parameters_device(device: torch.device) -> None:
    """Only observable on CUDA (``pytest --device cuda``): would kill DiscretizedLogistic._grid
    7, 10 (``device`` dropped); on the CPU those are equivalent."""
    d = DiscretizedLogistic(torch.zeros(3, device=device), torch.ones(3, device=device), 5)
    assert d.enumerate_support().device == d.loc.device
    total = d.log_prob(d.enumerate_support()).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(3, device=device))


# -- Normal ---------------------------------------------------------------------------------------
def test_normal_copies_and_pickles_before_and_after_a_draw() -> None:
    """A Normal that has never drawn (no ``_noise`` in its ``__dict__``) deep-copies and
    pickles; after a draw the copy forgets the draw and scores by the density formula (float64,
    1e-15).

    Kills Normal.__getstate__ 4 (``state.pop("_noise")`` raises KeyError before any draw).
    """
    loc, scale = torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([2.0, 0.25], dtype=F64)
    fresh = Normal(loc, scale)
    for copied in (copy.deepcopy(fresh), pickle.loads(pickle.dumps(fresh))):
        assert torch.equal(copied.loc, loc) and torch.equal(copied.scale, scale)
    drawn = Normal(loc, scale.clone().requires_grad_())
    z = drawn.rsample()
    copied = copy.deepcopy(drawn)
    assert copied._noise is None
    x = z.detach()
    ref = torch.tensor(
        [
            -0.5 * ((float(v) - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)
            for v, m, s in zip(x, (0.5, -1.0), (2.0, 0.25))
        ],
        dtype=F64,
    )
    torch.testing.assert_close(copied.log_prob(x).detach(), ref, atol=1e-15, rtol=0.0)


# -- spike-and-slab -------------------------------------------------------------------------------
def test_relaxed_spike_and_slab_exact_keeps_validate_args() -> None:
    """``exact()`` validates as the relaxed distribution was told to, not as the global setting
    says: with validation off globally, ``validate_args=True`` still rejects a NaN value; with
    it on, ``validate_args=False`` accepts an invalid (negative) scale.

    Kills RelaxedSpikeAndSlab.exact 4, 8.
    """
    with pyro.validation_enabled(False):
        q = RelaxedSpikeAndSlab(0.5, gate_logits=0.0, validate_args=True)
        with pytest.raises(ValueError, match="support"):
            q.exact().log_prob(torch.tensor(float("nan")))
    with pyro.validation_enabled(True):
        q = RelaxedSpikeAndSlab(0.5, gate_logits=0.0, scale=-1.0, validate_args=False)
        assert isinstance(q.exact(), SpikeAndSlab)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_spike_and_slab_traversal_values_are_the_mixture_quantiles(dtype: torch.dtype) -> None:
    """Checked through the mixture CDF F(z) = gamma Phi((z - mu)/sigma) + (1 - gamma) 1[z >= 0]
    (SciPy): a nonzero value v has F(v) = q (1e-9 in float64; 1e-5 in float32, the parameters'
    rounding), and exact zeros come where q lies in the spike [a, a + 1 - gamma],
    a = gamma Phi(-mu/sigma) (within the documented 1e-6). Shape ``(Q, *batch)``.

    Kills _SpikeAndSlabBase.traversal_values 1-20.
    """
    from scipy.stats import norm

    gamma = torch.tensor([[0.3, 0.6, 0.9], [0.5, 0.2, 0.95]], dtype=dtype)
    loc = torch.tensor([[0.5, -1.0, 0.1], [2.0, 0.0, -0.3]], dtype=dtype)
    scale = torch.tensor([[0.7, 1.5, 0.2], [0.4, 1.0, 3.0]], dtype=dtype)
    d = SpikeAndSlab(gate_probs=gamma, loc=loc, scale=scale)
    qs = [0.02 + 0.08 * i for i in range(13)]
    quantiles = torch.tensor(qs)  # float32, as the figures pass them
    out = d.traversal_values(quantiles)
    assert out.shape == (13, 2, 3) and out.dtype == dtype
    tol = 1e-9 if dtype == F64 else 1e-5
    for i, q in enumerate(quantiles.tolist()):
        for b in range(2):
            for k in range(3):
                g, m, sd = (float(t[b, k]) for t in (gamma, loc, scale))
                v = float(out[i, b, k])
                if v == 0.0:
                    a = g * norm.cdf(-m / sd)
                    assert a - 1e-6 <= q <= a + 1 - g + 1e-6, (q, g, m, sd)
                else:
                    cdf = g * norm.cdf((v - m) / sd) + (1 - g) * (v > 0)
                    assert abs(cdf - q) < tol, (q, v, g, m, sd)
    assert bool((out == 0).any()) and bool((out != 0).any())


def test_spike_and_slab_validation_error_names_the_open_interval() -> None:
    """A gate probability outside (0, 1) is rejected with a message stating the open interval
    in torch's notation for intervals.

    Kills _OpenUnitInterval.__repr__ 1, 2, 3.
    """
    with pytest.raises(
        ValueError, match=r"the constraint OpenInterval\(lower_bound=0\.0, upper_bound=1\.0\), but"
    ):
        SpikeAndSlab(gate_probs=torch.tensor([1.5]))


# -- von Mises ------------------------------------------------------------------------------------
def _density(t: float, kappa: float) -> float:
    return math.exp(kappa * (math.cos(t) - 1.0)) / (2.0 * math.pi * special.i0e(kappa))


def _quad_cdf(x: float, kappa: float) -> float:
    """Integral of the density from -pi to x in [-pi, pi] (SciPy, asked for 1e-14)."""
    value, _ = integrate.quad(_density, -math.pi, x, args=(kappa,), epsabs=1e-14, epsrel=1e-13)
    return value


@pytest.mark.parametrize("kappa", [0.5, 3.0, 80.0])
def test_von_mises_cdf_takes_a_python_float_concentration(kappa: float) -> None:
    """``von_mises_cdf(x, 3.0)`` equals quadrature to 1e-10 (float64; the documented accuracy
    is 1e-11) and keeps x's dtype and shape.

    Kills von_mises_cdf 2, 3, 4, 5, 6, 7.
    """
    xs = [-2.5, -0.2, 0.0, 0.1, 1.3, 3.0]
    got = von_mises_cdf(torch.tensor(xs, dtype=F64), kappa)
    ref = torch.tensor([_quad_cdf(x, kappa) for x in xs], dtype=F64)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0.0)
    got32 = von_mises_cdf(torch.tensor(xs).reshape(2, 3), kappa)
    assert got32.dtype == torch.float32 and got32.shape == (2, 3)


@pytest.mark.parametrize("kappa", [0.5, 3.0, 80.0])
def test_von_mises_cdf_backward(kappa: float) -> None:
    """dF/dx is the density (closed form via SciPy's i0e, 1e-12 relative), also for angles
    outside [-pi, pi]; dF/dkappa matches central differences of the quadrature CDF (step
    h = 1e-3 kappa: truncation ~ h^2 F''' < 1e-7 kappa^-1, quadrature error / h ~ 1e-11;
    tolerance 1e-6 relative to max |dF/dk| on the grid).

    Kills _VonMisesCDF.forward 13, 14 (x or kappa not saved for backward).
    """
    xs = [-2.5, -0.3, 0.05, 0.4, 2.0]
    shifted = [x + 2 * math.pi * p for x, p in zip(xs, (0, 1, -1, 2, 0))]
    x = torch.tensor(shifted, dtype=F64, requires_grad=True)
    k = torch.full((len(xs),), kappa, dtype=F64, requires_grad=True)
    gx, gk = torch.autograd.grad(von_mises_cdf(x, k).sum(), (x, k))
    ref_x = torch.tensor([_density(t, kappa) for t in xs], dtype=F64)
    torch.testing.assert_close(gx, ref_x, rtol=1e-12, atol=0.0)
    h = 1e-3 * kappa
    fd = torch.tensor(
        [(_quad_cdf(t, kappa + h) - _quad_cdf(t, kappa - h)) / (2 * h) for t in xs], dtype=F64
    )
    torch.testing.assert_close(gk, fd, atol=1e-6 * float(fd.abs().max()), rtol=0.0)


def _wrap(angle: float) -> float:
    """Into [-pi, pi) with Python's float modulo (sign of the divisor)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_von_mises_traversal_values(dtype: torch.dtype) -> None:
    """Q angles spaced 2 pi / Q around the circle from loc - pi, in [-pi, pi), shape
    ``(Q, *batch)``, dtype of loc; against the docstring's formula in Python floats, to 1e-12
    in float64 (computed in float64) and 1 float32 ulp of pi in float32.

    Kills ReparameterizedVonMises.traversal_values 1-4, 6, 7, 9-26.
    """
    locs = [[0.3, -2.9, 3.1], [7.0, -4.0, 0.0]]
    loc = torch.tensor(locs, dtype=dtype)
    d = ReparameterizedVonMises(loc, torch.ones(2, 3, dtype=dtype))
    q = 8
    got = d.traversal_values(torch.linspace(0.05, 0.95, q))
    assert got.shape == (q, 2, 3) and got.dtype == dtype
    assert bool(((got >= -math.pi) & (got < math.pi)).all())
    ref = torch.tensor(
        [
            [[_wrap(float(m) - math.pi + 2 * math.pi * j / q) for m in row] for row in loc]
            for j in range(q)
        ],
        dtype=F64,
    )
    atol = 1e-12 if dtype == F64 else 4e-7
    # compare on the circle, so a value rounded to -pi on one side and pi on the other agrees
    diff = torch.remainder(got.double() - ref + math.pi, 2 * math.pi) - math.pi
    assert float(diff.abs().max()) < atol


def test_von_mises_histogram_parts() -> None:
    """The figures' labels ("circular mean", "concentration κ"), the location reduced to
    [-pi, pi) in float64 (Python's float modulo, 1e-14: rounding) and the concentration.

    Kills ReparameterizedVonMises.histogram_parts 1-6, 8-11.
    """
    locs = [0.5, 4.0, -3.5, 7.0, -1.0]
    kappa = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    d = ReparameterizedVonMises(torch.tensor(locs), kappa)
    mean_name, mean, spread_name, spread = d.histogram_parts()
    assert (mean_name, spread_name) == ("circular mean", "concentration κ")
    assert mean.dtype == F64 and bool(((mean >= -math.pi) & (mean < math.pi)).all())
    ref = torch.tensor([_wrap(float(torch.tensor(v))) for v in locs], dtype=F64)
    torch.testing.assert_close(mean, ref, atol=1e-14, rtol=0.0)
    assert torch.equal(spread, kappa)


def test_von_mises_figures_are_on_the_parameters_device(device: torch.device) -> None:
    """Only observable on CUDA (``pytest --device cuda``): would kill traversal_values 5, 8
    (``device`` dropped from the arange); on the CPU those are equivalent."""
    d = ReparameterizedVonMises(torch.zeros(3, device=device), torch.ones(3, device=device))
    assert d.traversal_values(torch.linspace(0.1, 0.9, 4)).device == d.loc.device


# -- variational families -------------------------------------------------------------------------
def test_normal_on_support_prints_its_family() -> None:
    """The module printout (the architecture a run records) names the family and, off the real
    line, the support as torch prints it.

    Kills NormalOnSupport.extra_repr 2, 3, 4.
    """
    assert repr(NormalOnSupport()) == "NormalOnSupport(Normal(loc, scale))"
    on_positive = NormalOnSupport(constraints.positive)
    assert repr(on_positive) == f"NormalOnSupport(Normal(loc, scale) on {constraints.positive})"


def test_normal_scores_its_own_draw_from_the_noise() -> None:
    """At its latest draw, log_prob is -eps^2 / 2 - log sigma - log(2 pi) / 2 of that draw's
    noise, bitwise (the shortcut is taken), where the parent's form -((z - mu) / sigma)^2 / 2
    rounds differently in some entries (checked here too, so the test can tell the two apart)."""
    from torch.distributions.utils import _standard_normal

    loc = torch.linspace(-3.0, 3.0, 4000).requires_grad_()
    scale = torch.linspace(0.01, 5.0, 4000)
    d = Normal(loc, scale)
    torch.manual_seed(0)
    z = d.rsample()
    torch.manual_seed(0)
    eps = _standard_normal(z.shape, dtype=z.dtype, device=z.device)
    shortcut = -0.5 * eps.square() - scale.log() - 0.5 * math.log(2 * math.pi)
    parent = pyro.distributions.Normal(loc, scale).log_prob(z)
    assert not torch.equal(parent, shortcut)
    assert torch.equal(d.log_prob(z), shortcut)
