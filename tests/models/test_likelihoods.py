r"""Every likelihood in :mod:`ppl_vae.models.likelihoods`, tested from one catalogue.

A new likelihood module is discovered automatically (``pkgutil``) and must add one line to
:data:`CATALOGUE` (module, constructor kwargs, a value outside its support) and one reference
``log_prob`` to :data:`REFERENCE`; :func:`test_catalogue_lists_every_module` fails otherwise.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.special as sp
import scipy.stats as st
import torch
from torch import nn

import ppl_vae.models.likelihoods as likelihoods_pkg
from ppl_vae.models.distributions.continuous_bernoulli import (
    StableContinuousBernoulli,
    cb_icdf,
    cb_mean,
)
from ppl_vae.models.distributions.discretized_logistic import DiscretizedLogistic
from ppl_vae.models.distributions.family import base_distribution
from ppl_vae.models.errors import ConfigError
from ppl_vae.models.likelihoods.base import Likelihood
from ppl_vae.models.likelihoods.units import bits_per_dim

NAN = float("nan")

#: (module, constructor kwargs, a value outside the support). One line per configuration.
CATALOGUE: list[tuple[str, dict[str, Any], float]] = [
    ("bernoulli", {}, 0.5),
    ("continuous_bernoulli", {}, 1.5),
    ("normal", {"scale": "fixed"}, NAN),
    ("normal", {"scale": "shared"}, NAN),
    ("normal", {"scale": "per-element"}, NAN),
    ("normal", {"scale": "predicted"}, NAN),
    ("laplace", {"scale": "fixed"}, NAN),
    ("laplace", {"scale": "shared"}, NAN),
    ("laplace", {"scale": "per-element"}, NAN),
    ("laplace", {"scale": "predicted"}, NAN),
    ("discretized_logistic", {"num_levels": 17}, 0.3),
    ("discretized_logistic", {"num_levels": 256}, 0.5 + 0.3 / 255),
    ("discretized_logistic", {"num_levels": 256, "num_mixtures": 3}, 0.5 + 0.3 / 255),
    ("discretized_logistic", {"num_levels": 17, "num_mixtures": 2}, -1.0 / 16),
]

#: Package modules that hold no likelihood class.
NOT_LIKELIHOODS = {"base", "units"}


def _case_id(case: tuple[str, dict[str, Any], float]) -> str:
    name, kwargs, _ = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items())


CASES = [pytest.param(c, id=_case_id(c)) for c in CATALOGUE]


def _likelihood_class(module: str) -> type[Likelihood]:
    mod = importlib.import_module(f"{likelihoods_pkg.__name__}.{module}")
    classes = [
        c
        for c in vars(mod).values()
        if isinstance(c, type)
        and issubclass(c, Likelihood)
        and c is not Likelihood
        and c.__module__ == mod.__name__
    ]
    assert len(classes) == 1, f"{module} must define exactly one Likelihood subclass: {classes}"
    return classes[0]


def make(case: tuple[str, dict[str, Any], float], data_shape: tuple[int, ...]) -> Likelihood:
    name, kwargs, _ = case
    return _likelihood_class(name)(data_shape, **kwargs)


def decoder_out(lik: Likelihood, batch: tuple[int, ...], std: float = 1.0) -> torch.Tensor:
    """Random decoder output ``(*batch, P, *data_shape)``."""
    return std * torch.randn(*batch, lik.params_per_element, *lik.data_shape)


def _has_unit_edges(lik: Likelihood) -> bool:
    """Whether 0 and 1 are both in the support (then tests put them in the data)."""
    return bool(lik.support.check(torch.tensor([0.0, 1.0])).all())


# -- references: elementwise log p(x) in float64 from SciPy or a direct formula ---------------


def _ref_bernoulli(lik: Likelihood, out: np.ndarray, x: np.ndarray) -> np.ndarray:
    return st.bernoulli.logpmf(x, sp.expit(out[..., 0, :]))


def _ref_continuous_bernoulli(lik: Likelihood, out: np.ndarray, x: np.ndarray) -> np.ndarray:
    eta = out[..., 0, :]
    safe = np.where(eta == 0, 1.0, eta)
    log_c = np.where(eta == 0, math.log(2.0), np.log(safe / np.tanh(safe / 2)))
    return x * eta - np.logaddexp(0.0, eta) + log_c


def _scale_of(lik: Likelihood, out: np.ndarray) -> np.ndarray:
    return base_distribution(lik(torch.from_numpy(out))).scale.detach().numpy()


def _ref_normal(lik: Likelihood, out: np.ndarray, x: np.ndarray) -> np.ndarray:
    return st.norm.logpdf(x, loc=out[..., 0, :], scale=_scale_of(lik, out))


def _ref_laplace(lik: Likelihood, out: np.ndarray, x: np.ndarray) -> np.ndarray:
    # Direct formula: scipy 1.17's laplace.logpdf returns -inf once the pdf underflows.
    scale = _scale_of(lik, out)
    return -np.log(2 * scale) - np.abs(x - out[..., 0, :]) / scale


def _ref_discretized_logistic(lik: Likelihood, out: np.ndarray, x: np.ndarray) -> np.ndarray:
    m, top = lik.num_mixtures, lik.num_levels - 1
    if m == 1:
        logits, loc, raw = np.zeros_like(out[..., :1, :]), out[..., 0:1, :], out[..., 1:2, :]
    else:
        logits, loc, raw = out[..., :m, :], out[..., m : 2 * m, :], out[..., 2 * m :, :]
    scale = np.exp(np.clip(raw, lik.min_log_scale, lik.max_log_scale))
    xs = x[..., None, :]
    a, b = (xs + 0.5 / top - loc) / scale, (xs - 0.5 / top - loc) / scale
    logcdf_a, logcdf_b = st.logistic.logcdf(a), st.logistic.logcdf(b)
    logsf_a, logsf_b = st.logistic.logsf(a), st.logistic.logsf(b)
    # log(F(a) - F(b)) left of the location, log(S(b) - S(a)) right of it, so that neither
    # subtracts two numbers close to 1 and nothing underflows.
    with np.errstate(divide="ignore"):
        left = logcdf_a + np.log1p(-np.exp(logcdf_b - logcdf_a))
        right = logsf_b + np.log1p(-np.exp(logsf_a - logsf_b))
    log_mass = np.where(xs > loc, right, left)
    log_mass = np.where(np.isclose(xs, 1.0), logsf_b, log_mass)  # edge bins reach +-infinity
    log_mass = np.where(np.isclose(xs, 0.0), logcdf_a, log_mass)
    log_w = logits - sp.logsumexp(logits, axis=-2, keepdims=True)
    return sp.logsumexp(log_mass + log_w, axis=-2)


REFERENCE: dict[str, Callable[[Likelihood, np.ndarray, np.ndarray], np.ndarray]] = {
    "bernoulli": _ref_bernoulli,
    "continuous_bernoulli": _ref_continuous_bernoulli,
    "normal": _ref_normal,
    "laplace": _ref_laplace,
    "discretized_logistic": _ref_discretized_logistic,
}


# -- the catalogue is complete ------------------------------------------------------------------


def test_catalogue_lists_every_module() -> None:
    discovered = {
        m.name for m in pkgutil.iter_modules(likelihoods_pkg.__path__) if not m.name.startswith("_")
    } - NOT_LIKELIHOODS
    assert discovered == {name for name, _, _ in CATALOGUE}
    assert discovered == set(REFERENCE)
    for name in discovered:
        _likelihood_class(name)  # exactly one Likelihood subclass per module


# -- normalisation -----------------------------------------------------------------------------

# Decoder outputs for one element: the first parameter (logits / loc) spans near-zero and large
# values; further parameters (log-scales, mixture parameters) are cycled from RAW_OTHER.
RAW_FIRST = [0.0, 1e-3, -0.0999, 0.1001, 1.0, -5.0, 30.0, -50.0, 0.4]
RAW_OTHER = [0.0, -2.0, 2.0, 0.5, -1.0]


def _one_element_outputs(p: int) -> torch.Tensor:
    rows = []
    for i, first in enumerate(RAW_FIRST):
        rows.append([first] + [RAW_OTHER[(i + j) % len(RAW_OTHER)] for j in range(p - 1)])
    return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), p, 1)


@pytest.mark.parametrize("case", CASES)
def test_normalises(case: tuple[str, dict[str, Any], float]) -> None:
    """Sum of the pmf over its support, or trapezoid integral of the density, equals 1.

    Tolerances: 1e-12 for sums (float64 rounding of at most 256 terms); 1e-6 for integrals
    (the trapezoid rule on 400,001 nodes: largest error measured 2.3e-8, Laplace at scale 0.014).
    """
    lik = make(case, (1,)).double().requires_grad_(False)
    outs = _one_element_outputs(lik.params_per_element)
    for out in outs:
        d = lik(out)
        support = base_distribution(d).support
        if support.is_discrete:
            values = base_distribution(d).enumerate_support(expand=False)
            total = d.log_prob(values).exp().sum()
            assert abs(float(total) - 1.0) < 1e-12, (out, float(total))
            continue
        n = 400_001
        if support is torch.distributions.constraints.unit_interval:
            x = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        else:  # the real line through x = mean + tan(theta): dense near the mean
            theta = torch.linspace(-math.pi / 2, math.pi / 2, n, dtype=torch.float64)[1:-1]
            x = float(lik.mean(out)) + torch.tan(theta)
        total = torch.trapezoid(d.log_prob(x.unsqueeze(-1)).exp(), x)
        assert abs(float(total) - 1.0) < 1e-6, (out, float(total))


# -- log_prob against SciPy / direct formulas --------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_log_prob_matches_reference(case: tuple[str, dict[str, Any], float]) -> None:
    """Elementwise log p(x) equals the float64 reference within 1e-9 relative (+1e-10 absolute)."""
    lik = make(case, (5,)).double().requires_grad_(False)
    out = decoder_out(lik, (40,), std=2.0).double()
    x = lik(out).sample()
    if _has_unit_edges(lik):
        x[:, 0], x[:, 1] = 0.0, 1.0
    got = base_distribution(lik(out)).log_prob(x)
    want = REFERENCE[case[0]](lik, out.numpy(), x.numpy())
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9, atol=1e-10)
    # The Independent wrapper sums over the data dims.
    np.testing.assert_allclose(lik(out).log_prob(x).detach().numpy(), want.sum(-1), rtol=1e-9)


# -- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (4,), (2, 4)], ids=str)
@pytest.mark.parametrize("data_shape", [(64,), (1, 28, 28), (3, 32, 32)], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_shapes(
    case: tuple[str, dict[str, Any], float], data_shape: tuple[int, ...], batch: tuple[int, ...]
) -> None:
    lik = make(case, data_shape)
    out = decoder_out(lik, batch)
    d = lik(out)
    assert d.batch_shape == batch and d.event_shape == data_shape
    x = d.sample()
    assert x.shape == batch + data_shape
    assert d.log_prob(x).shape == batch
    assert lik.mean(out).shape == batch + data_shape
    lik.check_data(x)
    if batch == (2, 4):  # leading particle dim: data (4, ...) broadcast against (2, 4) params
        assert d.log_prob(x[0]).shape == batch
    if data_shape == (64,):  # what plates do to a distribution
        assert d.expand((3, *batch)).sample().shape == (3, *batch, *data_shape)
    with pytest.raises(ConfigError, match=type(lik).__name__):
        lik(torch.zeros(*batch, lik.params_per_element + 1, *data_shape))


@pytest.mark.parametrize("validate", [False, True], ids=["unvalidated", "validated"])
@pytest.mark.parametrize("batch", [(5,), (3, 5)], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_log_prob_sum_equals_distribution_sum(
    case: tuple[str, dict[str, Any], float], batch: tuple[int, ...], validate: bool
) -> None:
    # The fast path's scalar: any override (a fused kernel) equals the distribution's sum in
    # value and gradient, to float32 rounding; data (5, D) broadcast against particles (3, 5).
    lik = make(case, (64,))
    out = decoder_out(lik, batch, std=3.0).requires_grad_()
    x = lik(decoder_out(lik, (5,))).sample()
    with pyro.validation_enabled(validate):
        fused = lik.log_prob_sum(out, x)
        (g_fused,) = torch.autograd.grad(fused, out)
        reference = lik(out).log_prob(x).sum()
        (g_ref,) = torch.autograd.grad(reference, out)
    assert fused.shape == ()
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-5, atol=1e-6)


def test_bernoulli_log_prob_sum_falls_back_for_other_dtypes() -> None:
    lik = _likelihood_class("bernoulli")((4,))
    out = torch.randn(2, 1, 4)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    with pyro.validation_enabled(False):
        value = lik.log_prob_sum(out, x)
    torch.testing.assert_close(value, lik(out).log_prob(x).sum())


# -- gradients ---------------------------------------------------------------------------------

EXTREMES = [-50.0, -15.0, -1.0, 0.0, 1e-3, 1.0, 15.0, 50.0]


@pytest.mark.parametrize("case", CASES)
def test_gradients_finite_at_extremes(case: tuple[str, dict[str, Any], float]) -> None:
    """log p(x) and E[x] and their gradients are finite for every combination of extreme outputs."""
    lik = make(case, (len(EXTREMES),))
    p, n = lik.params_per_element, len(EXTREMES)
    # Row r, parameter j, element i gets EXTREMES[(i + r * j) % n]: every pair of values for
    # the first two parameters occurs.
    idx = (torch.arange(n) + torch.arange(n)[:, None, None] * torch.arange(p)[None, :, None]) % n
    out = torch.tensor(EXTREMES)[idx].requires_grad_(True)
    x = lik(torch.zeros_like(out)).sample()
    if _has_unit_edges(lik):
        x[:, 0], x[:, 1] = 0.0, 1.0
    log_p = lik(out).log_prob(x)
    assert torch.isfinite(log_p).all()
    (log_p.sum() + lik.mean(out).sum()).backward()
    assert torch.isfinite(out.grad).all()


# -- mean --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_mean_matches_monte_carlo(case: tuple[str, dict[str, Any], float]) -> None:
    """Sample mean of 4000 draws within 5 standard errors of ``mean`` (per element, 6 elements)."""
    lik = make(case, (6,)).requires_grad_(False)
    out = decoder_out(lik, ())
    n = 4000
    with torch.no_grad():
        draws = lik(out).sample((n,))
        mean = lik.mean(out)
    se = draws.std(0) / math.sqrt(n)
    assert ((draws.mean(0) - mean).abs() <= 5 * se + 1e-6).all(), (draws.mean(0), mean, se)


# -- data checks -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_check_data_accepts_support_rejects_outside(
    case: tuple[str, dict[str, Any], float],
) -> None:
    lik = make(case, (1, 4, 4))
    x = lik(decoder_out(lik, (8,))).sample()
    lik.check_data(x)
    x[3, 0, 2, 1] = case[2]
    hint = lik.suggestion(x)
    assert hint, "a likelihood must suggest what to do with data outside its support"
    with pytest.raises(ConfigError) as info:
        lik.check_data(x, name="training data")
    message = str(info.value)
    assert type(lik).__name__ in message and hint in message and "training data" in message


def test_bernoulli_suggests_continuous_bernoulli_for_grey_levels() -> None:
    lik = make(("bernoulli", {}, 0.5), (4,))
    with pytest.raises(ConfigError, match=r"continuous-bernoulli.*binari"):
        lik.check_data(torch.tensor([[0.0, 0.25, 1.0, 0.5]]))


def test_continuous_bernoulli_support_is_closed_and_suggests_normal() -> None:
    lik = make(("continuous_bernoulli", {}, 1.5), (4,))
    lik.check_data(torch.tensor([[0.0, 0.25, 1.0, 0.5]]))
    with pytest.raises(ConfigError, match=r"values in \[0, 1\].*--likelihood normal"):
        lik.check_data(torch.tensor([[-0.5, 0.25, 1.0, 0.5]]))
    with pytest.raises(ConfigError, match="divide by the largest level"):
        lik.check_data(torch.tensor([[0.0, 17.0, 255.0, 3.0]]))


def test_discretized_logistic_suggestions() -> None:
    lik = make(("discretized_logistic", {"num_levels": 256}, 0.5), (8,))
    digits = torch.randint(0, 17, (50, 8)) / 16.0
    with pytest.raises(ConfigError, match="grid of 17 levels: set num_levels=17"):
        lik.check_data(digits)
    with pytest.raises(ConfigError, match=r"continuous-bernoulli.*normal"):
        lik.check_data(torch.rand(50, 8, dtype=torch.float64))
    with pytest.raises(ConfigError, match="divide by num_levels - 1"):
        lik.check_data(torch.randint(0, 256, (50, 8)).float())
    lik.check_data(torch.randint(0, 256, (50, 8)) / 255.0 + 5e-5)  # within the 1e-4 tolerance


# -- training ----------------------------------------------------------------------------------


class _TinyVAE(nn.Module):
    """Normal prior on z, linear decoder to (P, *data_shape), linear encoder + Normal guide."""

    def __init__(self, lik: Likelihood, latent_dim: int = 2) -> None:
        super().__init__()
        self.lik, self.latent_dim = lik, latent_dim
        dims = math.prod(lik.data_shape)
        self.decoder = nn.Linear(latent_dim, lik.params_per_element * dims)
        self.encoder = nn.Linear(dims, 2 * latent_dim)

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            out = self.decoder(z).reshape(*z.shape[:-1], -1, *self.lik.data_shape)
            pyro.sample("x", self.lik(out), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x.flatten(1)).chunk(2, dim=-1)
            scale = torch.nn.functional.softplus(raw) + 1e-3
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


@pytest.mark.parametrize("case", CASES)
def test_svi_trains(case: tuple[str, dict[str, Any], float]) -> None:
    """60 Adam steps on Trace_ELBO: every loss finite, last 10 average below the first 10."""
    data_shape = (6,)
    truth = make(case, data_shape)
    w = torch.randn(2, truth.params_per_element, *data_shape)
    with torch.no_grad():
        x = truth(torch.einsum("nd,dp...->np...", torch.randn(64, 2), w)).sample()
    vae = _TinyVAE(make(case, data_shape))
    optim = torch.optim.Adam(vae.parameters(), lr=0.03)
    elbo = pyro.infer.Trace_ELBO()
    losses = []
    for _ in range(60):
        optim.zero_grad()
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses


# -- devices -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_runs_on_device(case: tuple[str, dict[str, Any], float], device: torch.device) -> None:
    lik = make(case, (3, 4)).to(device)
    out = decoder_out(lik, (2,)).to(device)
    d = lik(out)
    x = d.sample()
    assert x.device.type == device.type
    assert d.log_prob(x).device.type == device.type
    assert lik.mean(out).device.type == device.type
    lik.check_data(x)


# -- scale modes of the location-scale likelihoods ---------------------------------------------


@pytest.mark.parametrize("module", ["normal", "laplace"])
@pytest.mark.parametrize("mode", ["fixed", "shared", "per-element", "predicted"])
def test_scale_modes(module: str, mode: str) -> None:
    """Every mode starts at ``init_scale``; learned modes expose a parameter of the right shape."""
    lik = make((module, {"scale": mode, "init_scale": 0.3}, NAN), (2, 3))
    out = torch.zeros(4, lik.params_per_element, 2, 3)
    np.testing.assert_allclose(_scale_of(lik, out.numpy()), np.full((4, 2, 3), 0.3), rtol=1e-6)
    n_params = sum(p.numel() for p in lik.parameters())
    assert n_params == {"fixed": 0, "shared": 1, "per-element": 6, "predicted": 0}[mode]
    assert lik.params_per_element == (2 if mode == "predicted" else 1)


def _spread_by_hand(module: str, x: np.ndarray) -> float:
    """The family's ML scale with per-element locations, pooled (numpy, float64)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    if module == "normal":
        return float(np.sqrt(flat.var(0).mean()))
    # torch's median of an even count is the lower middle value; the MAD is the same for any
    # median in the middle interval, so numpy's average of the two middle values gives it too
    return float(np.abs(flat - np.median(flat, 0)).mean())


@pytest.mark.parametrize("module", ["normal", "laplace"])
@pytest.mark.parametrize("mode", ["fixed", "shared", "per-element", "predicted"])
def test_initial_scale_is_the_data_spread_unless_given(module: str, mode: str) -> None:
    r"""Without ``init_scale`` the scale starts at the training data's pooled spread (the
    family's ML scale with per-element locations: sd for the Normal, mean absolute deviation from
    the medians for the Laplace), in every element and every mode; with ``init_scale`` it stays.
    Data of scale ~1000 with elements of different spreads, so no constant could pass; float32
    parameters: 1e-5 relative."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 2, 3)) * [[1.0, 2.0, 3.0]] * 1000 + 50).astype(np.float32)
    cls = _likelihood_class(module)
    out = np.zeros((4, 2 if mode == "predicted" else 1, 2, 3), dtype=np.float32)
    lik = cls((2, 3), scale=mode)
    np.testing.assert_allclose(_scale_of(lik, out), 0.1, rtol=1e-6)  # before the data
    lik.initialize_from_data(torch.from_numpy(x))
    spread = _spread_by_hand(module, x)
    assert spread > 1000  # far from the constant default
    np.testing.assert_allclose(_scale_of(lik, out), spread, rtol=1e-5)
    given = cls((2, 3), scale=mode, init_scale=0.3)
    given.initialize_from_data(torch.from_numpy(x))
    np.testing.assert_allclose(_scale_of(given, out), 0.3, rtol=1e-6)
    # constant data (spread zero) and a single point keep the default; the start is at least
    # twice min_scale
    for data in (np.full((10, 2, 3), 7.0, np.float32), x[:1]):
        kept = cls((2, 3), scale=mode)
        kept.initialize_from_data(torch.from_numpy(data))
        np.testing.assert_allclose(_scale_of(kept, out), 0.1, rtol=1e-6)
    tiny = cls((2, 3), scale=mode, min_scale=0.01)
    tiny.initialize_from_data(torch.from_numpy(x * 1e-6))
    np.testing.assert_allclose(_scale_of(tiny, out), 0.02, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fixed", "shared", "per-element", "predicted"])
def test_data_derived_scale_is_part_of_the_saved_state(mode: str) -> None:
    """A reopened model gets the data-derived scale from its state_dict (it never sees the
    data again); a predicted-scale state saved before the offset was a buffer still loads."""
    cls = _likelihood_class("normal")
    out = np.zeros((1, 2 if mode == "predicted" else 1, 3), dtype=np.float32)
    lik = cls((3,), scale=mode)
    lik.initialize_from_data(torch.randn(50, 3) * 40)
    reopened = cls((3,), scale=mode)
    reopened.load_state_dict(lik.state_dict())
    np.testing.assert_allclose(_scale_of(reopened, out), _scale_of(lik, out), rtol=1e-7)
    assert float(_scale_of(reopened, out).min()) > 10
    if mode == "predicted":
        old = {k: v for k, v in lik.state_dict().items() if not k.startswith("scale_")}
        legacy = cls((3,), scale=mode)
        legacy.load_state_dict(old)  # strict: no missing key
        np.testing.assert_allclose(_scale_of(legacy, out), 0.1, rtol=1e-6)
        # the raw output scales a data-derived start multiplicatively: -20 takes it to its floor
        # and +3 multiplies it by softplus(3.54) = 3.57 (an additive offset of ~40 could neither
        # go below ~10 with raw outputs clamped to +-30, nor more than +3 here)
        low = np.concatenate([out[:, :1], np.full_like(out[:, 1:], -20.0)], 1)
        assert float(_scale_of(lik, low).max()) < 2 * lik.min_scale
        high = np.concatenate([out[:, :1], np.full_like(out[:, 1:], 3.0)], 1)
        assert float(_scale_of(lik, high).min()) > 3.5 * float(_scale_of(lik, out).max())


def test_fit_starts_the_normal_scale_at_the_training_data_spread() -> None:
    """Through the engine: ``fit`` calls ``initialize_from_data`` on the training split before
    the first step (a callback reads the scale then), on digits scaled by 100."""
    from ppl_vae import fit, load_data
    from ppl_vae.training import Callback

    ds = load_data("digits", seed=0)
    ds = load_data(ds.train_x.numpy() * 100, test_data=ds.test_x.numpy() * 100, seed=0)
    seen: list[float] = []

    class Probe(Callback):
        def on_train_start(self, trainer) -> None:
            seen.append(float(trainer.kind.module.likelihood.scale.detach()))

    fit(dataset=ds, likelihood="normal", epochs=1, hidden_dims=[16], latent_dim=2,
        log_likelihood_samples=2, quiet=True, figures=False, callbacks=[Probe()])  # fmt: skip
    assert seen == [pytest.approx(_spread_by_hand("normal", ds.train_x.numpy()), rel=1e-5)]
    assert seen[0] > 10


@pytest.mark.parametrize("module", ["normal", "laplace"])
def test_scale_arguments_rejected(module: str) -> None:
    cls = _likelihood_class(module)
    with pytest.raises(ConfigError, match="`scale`"):
        cls((3,), scale="learned")
    with pytest.raises(ConfigError, match="`init_scale`"):
        cls((3,), init_scale=0.0)
    with pytest.raises(ConfigError, match="`min_scale`"):
        cls((3,), init_scale=0.1, min_scale=0.2)


# -- continuous Bernoulli specifics -----------------------------------------------------------

LOGITS = [0.0, 1e-7, -1e-4, 1e-3, 0.05, -0.0999, 0.1001, 0.5, -1.0, 3.0, -10.0, 17.0, 50.0, -80.0]


def test_continuous_bernoulli_float32_matches_float64_formula() -> None:
    """float32 log p within 2e-6 relative + 1e-6 absolute of the float64 formula, all logits.

    ``torch.distributions.ContinuousBernoulli`` is off by 1.1 nats at logits = 50 (it clamps
    probs = sigmoid(logits) to 1 - eps); this is why the package has its own implementation.
    """
    eta = torch.tensor(LOGITS)
    x = torch.tensor([0.0, 0.3, 1.0])[:, None]
    got = StableContinuousBernoulli(eta).log_prob(x)
    want = _ref_continuous_bernoulli(lik=None, out=eta.double().numpy()[None, None], x=x.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-6)


def test_continuous_bernoulli_mean_and_icdf_exact() -> None:
    """Mean = integral of x p(x) (trapezoid, 1e-7); F(F^{-1}(u)) = u (1e-9 relative), float64."""
    eta = torch.tensor(LOGITS, dtype=torch.float64)
    d = StableContinuousBernoulli(eta)
    x = torch.linspace(0.0, 1.0, 400_001, dtype=torch.float64)[:, None]
    mean = torch.trapezoid(x * d.log_prob(x).exp(), x, dim=0)
    torch.testing.assert_close(cb_mean(eta), mean, rtol=0, atol=1e-7)
    u = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)[:, None]
    xs = cb_icdf(eta.expand(101, -1), u.expand(-1, len(LOGITS)))
    safe = torch.where(eta == 0, torch.ones_like(eta), eta)
    cdf = torch.where(eta.abs() < 1e-12, xs, torch.expm1(safe * xs) / torch.expm1(safe))
    torch.testing.assert_close(cdf, u.expand_as(cdf), rtol=1e-9, atol=1e-9)


def test_continuous_bernoulli_rsample_has_gradients() -> None:
    eta = torch.tensor(LOGITS, requires_grad=True)
    StableContinuousBernoulli(eta).rsample((10,)).sum().backward()
    assert torch.isfinite(eta.grad).all()


# -- discretised logistic specifics -----------------------------------------------------------


def test_discretized_logistic_far_tail_float32() -> None:
    """Bin masses far below 1e-5 (where PixelCNN++ falls back to a density), in float32.

    Reference: log(sigma(a) - sigma(b)) from SciPy's ``log_expit`` in float64. Tolerance 1e-5
    relative: float32 rounding of log-masses of size 1e3-1e5.
    """
    loc = torch.tensor([0.9, 0.05, 0.5, 0.0])
    scale = torch.exp(torch.tensor([-7.0, -7.0, 5.0, -2.0]))
    x = torch.tensor([51.0, 204.0, 128.0, 153.0]) / 255
    got = DiscretizedLogistic(loc, scale, 256).log_prob(x)
    h = 0.5 / 255
    a = (x.double() + h - loc.double()) / scale.double()
    b = (x.double() - h - loc.double()) / scale.double()
    la, lb = sp.log_expit(a.numpy()), sp.log_expit(b.numpy())
    la_, lb_ = sp.log_expit(-a.numpy()), sp.log_expit(-b.numpy())
    with np.errstate(divide="ignore"):  # the branch not taken may be log(0)
        left = la + np.log1p(-np.exp(lb - la))  # log(sigma(a) - sigma(b))
        right = lb_ + np.log1p(-np.exp(la_ - lb_))  # log(sigma(-b) - sigma(-a)), same mass
    want = np.where(x.numpy() > loc.numpy(), right, left)
    # Two masses underflow float32 (e^-104); the third is 6.6e-6, where sigma(a) - sigma(b) in
    # float32 would lose two digits.
    assert want[0] < -700 and want[1] < -700 and -13 < want[2] < math.log(1e-5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("num_levels", [2, 17, 256])
def test_discretized_logistic_mean_and_sampling_exact(num_levels: int) -> None:
    """Mean equals the grid sum (1e-12, float64); sample frequencies within 5 SE of the pmf."""
    loc = torch.tensor([[0.2, 0.7, 1.3], [-0.1, 0.5, 0.5]], dtype=torch.float64)
    scale = torch.tensor([[0.05, 0.2, 0.1], [0.3, 0.02, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    d = DiscretizedLogistic(loc, scale, num_levels, logits)
    grid = d.enumerate_support(expand=False)
    probs = d.log_prob(grid).exp()  # (K, 2)
    torch.testing.assert_close(d.mean, (grid * probs).sum(0), rtol=0, atol=1e-12)
    n = 20_000
    draws = d.sample((n,))
    freq = (draws[None] == grid[:, None]).double().mean(1)  # (K, 2)
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-9).all()


def test_discretized_logistic_arguments() -> None:
    cls = _likelihood_class("discretized_logistic")
    assert cls((4,)).params_per_element == 2
    assert cls((4,), num_mixtures=10).params_per_element == 30
    assert cls((4,)).num_levels == 256
    with pytest.raises(ConfigError, match="`num_levels`"):
        cls((4,), num_levels=1)
    with pytest.raises(ConfigError, match=r"`num_levels`.*got None"):
        cls((4,), num_levels=None)  # the engine passes the data set's None for unknown levels
    with pytest.raises(ConfigError, match="`num_mixtures`"):
        cls((4,), num_mixtures=0)
    with pytest.raises(ConfigError, match="`min_log_scale`"):
        cls((4,), min_log_scale=1.0, max_log_scale=0.0)


# -- units -------------------------------------------------------------------------------------


def test_bits_per_dim_pmf() -> None:
    # A uniform pmf over 256 levels in D dimensions costs exactly 8 bits per dimension.
    assert bits_per_dim(784 * math.log(256), 784, None) == pytest.approx(8.0, rel=1e-12)
    with pytest.raises(ConfigError, match="negative log-likelihood"):
        bits_per_dim(-3.0, 784, None)


def test_bits_per_dim_density_is_change_of_variables() -> None:
    """bpd of a density on x = y / 255 equals -log2 of the same density on y (1e-12)."""
    y = torch.randint(0, 256, (3 * 32 * 32,), dtype=torch.float64)
    loc, scale = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    nll_unit = -dist.Normal(loc, scale).log_prob(y / 255).sum()
    nll_levels = -dist.Normal(255 * loc, 255 * scale).log_prob(y).sum()
    want = float(nll_levels) / (y.numel() * math.log(2))
    assert bits_per_dim(float(nll_unit), y.numel(), 256) == pytest.approx(want, rel=1e-12)
    # The uniform density on [0, 1] costs log2(255) bits per dimension.
    assert bits_per_dim(0.0, 10, 256) == pytest.approx(math.log2(255), rel=1e-12)
    with pytest.raises(ConfigError, match="`num_levels`"):
        bits_per_dim(1.0, 10, 1)
    with pytest.raises(ConfigError, match="`num_dims`"):
        bits_per_dim(1.0, 0)


@pytest.mark.parametrize("name", ["normal", "laplace"])
def test_loc_scale_modes_edge_cases(name) -> None:
    cls = _likelihood_class(name)
    assert cls((4,), scale="fixed", init_scale=1e-4).scale.min() == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match=r"`min_scale` must be in \(0, init_scale\)"):
        cls((4,), scale="predicted", min_scale=0.0)
    lik = cls((4,), scale="predicted", min_scale=1e-3)
    out = torch.tensor([[0.0] * 4, [-1e4] * 4]).reshape(1, 2, 4)  # loc 0, raw scale -1e4
    d = lik(out)
    assert torch.isfinite(d.log_prob(torch.zeros(1, 4))).all()
    assert float(lik._loc_scale(out)[1].min()) >= 1e-3
