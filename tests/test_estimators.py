r"""Estimator registry, estimator gradients and the importance-sampled log-likelihood.

The reference model is conjugate, so the ELBO, its gradient and :math:`\log p(x)` are closed-form:

.. math::
    z \sim \mathcal{N}(0, I_D), \quad x \mid z \sim \mathcal{N}(w z, s^2 I_D), \quad
    q(z \mid x) = \mathcal{N}(a \odot x + b, \operatorname{diag}(c^2))

**One pass gives many independent gradient samples.** Every data row has its *own copy* of the
parameters :math:`(a, b, c, w)` (all copies equal), and the batch holds each of three base points
``R`` times. A row's parameters enter only that row's terms, so one ``backward`` yields ``R``
independent per-row gradient samples for each base point; means and standard errors come from
them without Python loops. Everything is float64, so "exactly zero" can be checked to 1e-10.

Tolerances: Monte Carlo means are compared within 5 standard errors (of the difference, when both
sides are Monte Carlo); with the few dozen comparisons here a false failure has probability below
1e-4, and the seeds are fixed (conftest), so the tests are deterministic.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ppl_vae import ConfigError
from ppl_vae.inference.estimators import (
    IWAE_ELBO,
    DifferentiableRenyi_ELBO,
    TraceDReG_ELBO,
    TraceSTL_ELBO,
    estimator_names,
    log_likelihood,
    make_elbo,
    parse_estimator,
)

DTYPE = torch.float64
NOISE_SCALE = 1.0  # s
X_BASE = torch.tensor([[0.5, -1.0], [1.5, 0.3], [-0.7, 2.0]], dtype=DTYPE)  # (3, D=2)
# a guide away from the posterior (the posterior at w = 1.2 has a = 0.49, b = 0, c = 0.64)
AWAY = {"a": [0.2, 0.7], "b": [0.3, -0.2], "c": [0.5, 1.1], "w": 1.2}
# the exact posterior at w = 1, s = 1: a = w / (w^2 + s^2), c = s / sqrt(w^2 + s^2)
EXACT = {"a": [0.5, 0.5], "b": [0.0, 0.0], "c": [0.5**0.5, 0.5**0.5], "w": 1.0}

# estimator name -> (spec used here, objective: alpha of the Renyi bound (1.0 = ELBO), K)
NUM_PARTICLES = 2
CASES = {
    "trace": ("trace", 1.0, NUM_PARTICLES),
    "meanfield": ("meanfield", 1.0, NUM_PARTICLES),
    "tracegraph": ("tracegraph", 1.0, NUM_PARTICLES),
    "enum": ("enum", 1.0, NUM_PARTICLES),
    "stl": ("stl", 1.0, NUM_PARTICLES),
    "renyi": ("renyi:0.5", 0.5, NUM_PARTICLES),
    "iwae": ("iwae:3", 0.0, 3),
    "dreg": ("dreg:3", 0.0, 3),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is fastest, and on a loaded 2-core machine
    the conftest's 2 threads made this file 5x more expensive (34 s vs 6.5 s CPU)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_every_registered_estimator_has_a_case() -> None:
    assert sorted(CASES) == estimator_names()


# --------------------------------------------------------------------------- the conjugate pair


class ConjugateModel(PyroModule):
    r"""The conjugate model; w has one row per data row.

    .. math:: z \sim \mathcal{N}(0, I), \quad x \mid z \sim \mathcal{N}(w z, s^2 I)
    """

    def __init__(self, w: torch.Tensor, scale_z: float | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(w)  # (N, 1)
        self.scale_z = scale_z
        self.particle_dims: list[int] = []

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            prior = dist.Normal(torch.zeros_like(x), 1.0).to_event(1)
            with poutine.scale(scale=self.scale_z or 1.0):
                z = pyro.sample("z", prior)
            self.particle_dims.append(z.shape[0] if z.dim() == 3 else 1)
            pyro.sample("x", dist.Normal(self.w * z, NOISE_SCALE).to_event(1), obs=x)


class ConjugateGuide(PyroModule):
    r"""The linear Gaussian guide; a, b, c have shape (N, D), one row per data row.

    .. math:: q(z \mid x) = \mathcal{N}(a x + b, \operatorname{diag}(c^2))
    """

    def __init__(
        self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, scale_z: float | None = None
    ) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Parameter(a), nn.Parameter(b), nn.Parameter(c)
        self.scale_z = scale_z

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1), poutine.scale(scale=self.scale_z or 1.0):
            pyro.sample("z", dist.Normal(self.a * x + self.b, self.c).to_event(1))


def make_pair(
    point: dict, copies: int, scale_z: float | None = None
) -> tuple[ConjugateModel, ConjugateGuide, torch.Tensor]:
    """Model, guide and data: the three base points repeated ``copies`` times, row params."""
    x = X_BASE.repeat(copies, 1)
    n = x.shape[0]

    def rows(v: list[float]) -> torch.Tensor:
        return torch.tensor(v, dtype=DTYPE).expand(n, -1).clone()

    model = ConjugateModel(torch.full((n, 1), point["w"], dtype=DTYPE), scale_z)
    guide = ConjugateGuide(rows(point["a"]), rows(point["b"]), rows(point["c"]), scale_z)
    return model, guide, x


def row_gradients(loss: torch.Tensor, model: ConjugateModel, guide: ConjugateGuide) -> torch.Tensor:
    """Per-row gradients of ``loss`` wrt (a, b, c, w): shape (N, 7)."""
    grads = torch.autograd.grad(loss, [guide.a, guide.b, guide.c, model.w])
    return torch.cat(grads, dim=-1)


def per_point(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (R*3, ...) -> mean and standard error per base point, each (3, ...)."""
    grouped = samples.reshape(-1, X_BASE.shape[0], *samples.shape[1:])
    return grouped.mean(0), grouped.std(0) / grouped.shape[0] ** 0.5


def closed_form_elbo(point: dict, x: torch.Tensor) -> torch.Tensor:
    r"""Per-point ELBO :math:`E_q[\log p(z) + \log p(x \mid z) - \log q(z)]`, shape (N,)."""
    a, b, c = (torch.tensor(point[k], dtype=DTYPE) for k in "abc")
    w, s2 = point["w"], NOISE_SCALE**2
    m = a * x + b
    log_prior = -0.5 * math.log(2 * math.pi) - 0.5 * (m**2 + c**2)
    log_lik = -0.5 * math.log(2 * math.pi * s2) - ((x - w * m) ** 2 + w**2 * c**2) / (2 * s2)
    entropy = 0.5 * math.log(2 * math.pi) + 0.5 + torch.log(c)
    return (log_prior + log_lik + entropy).sum(-1)


def closed_form_elbo_gradient(point: dict) -> torch.Tensor:
    """Gradient of the per-point negative ELBO wrt (a, b, c, w), shape (3, 7)."""
    model, guide, x = make_pair(point, 1)
    a, b, c, w = guide.a, guide.b, guide.c, model.w
    s2 = NOISE_SCALE**2
    m = a * x + b
    elbo = (-0.5 * (m**2 + c**2) - ((x - w * m) ** 2 + w**2 * c**2) / (2 * s2) + torch.log(c)).sum()
    return row_gradients(-elbo, model, guide)


def exact_log_evidence(point: dict, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = sum_d log N(x_d; 0, w^2 + s^2), shape (N,)."""
    var = point["w"] ** 2 + NOISE_SCALE**2
    return (-0.5 * math.log(2 * math.pi * var) - x**2 / (2 * var)).sum(-1)


def mc_renyi_rows(point: dict, alpha: float, num_particles: int, copies: int):
    r"""Plain-torch reparameterised samples of the K-particle Rényi objective, one per row.

    .. math:: \tfrac{1}{1-\alpha} \log \tfrac{1}{K} \textstyle\sum_k w_k^{1-\alpha}

    Returns the model, guide and the per-row objective (N,) (differentiable).
    """
    model, guide, x = make_pair(point, copies)
    eps = torch.randn((num_particles, *x.shape), dtype=DTYPE)
    loc = guide.a * x + guide.b
    z = loc + guide.c * eps
    log_w = (
        torch.distributions.Normal(0.0, 1.0).log_prob(z)
        + torch.distributions.Normal(model.w * z, NOISE_SCALE).log_prob(x)
        - torch.distributions.Normal(loc, guide.c).log_prob(z)
    ).sum(-1)
    objective = (torch.logsumexp((1 - alpha) * log_w, dim=0) - math.log(num_particles)) / (
        1 - alpha
    )
    return model, guide, objective


def reference_gradient(name: str, point: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point gradient of the estimator's negative objective and its standard error (3, 7)."""
    _, alpha, num_particles = CASES[name]
    if alpha == 1.0:
        grad = closed_form_elbo_gradient(point)
        return grad, torch.zeros_like(grad)
    model, guide, objective = mc_renyi_rows(point, alpha, num_particles, copies=100_000)
    return per_point(row_gradients(-objective.sum(), model, guide))


def estimator_gradients(spec: str, point: dict, copies: int, **options) -> torch.Tensor:
    """Per-row gradient samples of ``differentiable_loss`` (N, 7)."""
    model, guide, x = make_pair(point, copies)
    name = spec.partition(":")[0]
    if name == "enum":
        options.setdefault("strict_enumeration_warning", False)
    if name not in ("iwae", "dreg"):
        options.setdefault("num_particles", NUM_PARTICLES)
    elbo = make_elbo(spec, **options)
    return row_gradients(elbo.differentiable_loss(model, guide, x), model, guide)


def assert_within(mean, se, ref, ref_se, n_se: float = 5.0, atol: float = 1e-9) -> None:
    tol = n_se * (se**2 + ref_se**2).sqrt() + atol
    bad = (mean - ref).abs() > tol
    assert not bad.any(), f"estimate {mean[bad]} vs reference {ref[bad]}, tolerance {tol[bad]}"


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_reference(name: str, vectorize: bool) -> None:
    """Mean gradient of differentiable_loss = gradient of the estimator's objective (5 SE).

    Objectives: the ELBO (closed form) for trace/meanfield/tracegraph/enum/stl; the K-particle
    Rényi bound (alpha = 0.5, K = 2) for renyi and the IWAE-3 bound for iwae/dreg, whose
    gradients have no closed form: their reference is a plain-torch reparameterised Monte Carlo
    estimate over 100,000 rows per point, independent of Pyro. Per-row gradients are also checked
    for each of the 3 data points and 7 parameters separately.
    """
    spec = CASES[name][0]
    samples = estimator_gradients(spec, AWAY, copies=2000, vectorize_particles=vectorize)
    mean, se = per_point(samples)
    ref, ref_se = reference_gradient(name, AWAY)
    assert_within(mean, se, ref, ref_se)
    assert (ref.abs() > 5 * ref_se).all()  # the check is not vacuous: no component is ~0


def test_mc_reference_agrees_with_closed_form_elbo() -> None:
    """The plain-torch Monte Carlo reference at alpha -> 1 (here 1 - 1e-9, K = 1) matches the
    closed-form ELBO gradient (5 SE): validates the reference used for renyi/iwae/dreg."""
    model, guide, objective = mc_renyi_rows(AWAY, 1 - 1e-9, 1, copies=20_000)
    mean, se = per_point(row_gradients(-objective.sum(), model, guide))
    ref = closed_form_elbo_gradient(AWAY)
    assert_within(mean, se, ref, torch.zeros_like(ref), atol=1e-6)


@pytest.mark.parametrize(("variant", "base"), [("stl", "trace"), ("dreg:3", "iwae:3")])
def test_model_gradient_is_the_base_estimators(variant: str, base: str) -> None:
    """STL and DReG change only the guide's gradient: with the same seed (same samples) their
    decoder gradient equals Trace_ELBO's / IWAE's to 1e-12, while the guide's differs."""
    pyro.set_rng_seed(3)
    g_variant = estimator_gradients(variant, AWAY, copies=50)
    pyro.set_rng_seed(3)
    g_base = estimator_gradients(base, AWAY, copies=50)
    torch.testing.assert_close(g_variant[:, 6:], g_base[:, 6:], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(g_variant[:, :6], g_base[:, :6])


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_equals_pyro_loss_in_expectation(name: str) -> None:
    """The value of differentiable_loss and Pyro's `.loss` have the same mean (5 SE of the
    difference, 30 evaluations of each on 3 x 40 rows), and both match the objective: the
    closed-form negative ELBO, or the plain-torch Monte Carlo negative Rényi/IWAE bound."""
    spec, alpha, num_particles = CASES[name]
    model, guide, x = make_pair(AWAY, 40)
    options = {"strict_enumeration_warning": False} if name == "enum" else {}
    if name not in ("iwae", "dreg"):
        options["num_particles"] = NUM_PARTICLES
    elbo = make_elbo(spec, **options)
    values = torch.tensor([elbo.differentiable_loss(model, guide, x).item() for _ in range(30)])
    losses = torch.tensor([float(elbo.loss(model, guide, x)) for _ in range(30)])
    for a, b in ((values, losses),):
        tol = 5 * (a.var() / len(a) + b.var() / len(b)).sqrt()
        assert (a.mean() - b.mean()).abs() < tol
    if alpha == 1.0:
        ref, ref_se = -closed_form_elbo(AWAY, x).sum(), torch.tensor(0.0)
    else:
        _, _, objective = mc_renyi_rows(AWAY, alpha, num_particles, copies=20_000)
        per_row = -objective.detach().reshape(-1, 3).sum(-1)  # one value per copy of the 3 points
        ref, ref_se = 40 * per_row.mean(), 40 * per_row.std() / len(per_row) ** 0.5
    assert (values.mean() - ref).abs() < 5 * (values.var() / len(values) + ref_se**2).sqrt()


# --------------------------------------------------------------------------- variance


def _encoder_variance(samples: torch.Tensor) -> torch.Tensor:
    """Total per-row variance of the guide's gradient (a, b, c), summed over points and params."""
    grouped = samples[:, :6].reshape(-1, 3, 6)
    return grouped.var(0).sum()


@pytest.mark.parametrize(("variant", "base"), [("stl", "trace"), ("dreg:3", "iwae:3")])
def test_zero_variance_at_the_exact_posterior(variant: str, base: str) -> None:
    """At q = p(z|x) every STL/DReG guide-gradient sample is 0 (|g| < 1e-10 in float64: the
    path derivative of log p(x,z) - log q(z) vanishes and DReG's weights are all 1/K), while the
    base estimator's is not (its score term has standard deviation > 0.1)."""
    g_variant = estimator_gradients(variant, EXACT, copies=200)
    g_base = estimator_gradients(base, EXACT, copies=200)
    assert g_variant[:, :6].abs().max() < 1e-10
    assert (g_base[:, :6].reshape(-1, 3, 6).std(0) > 0.1).all()


@pytest.mark.parametrize(("variant", "base"), [("stl", "trace"), ("dreg:3", "iwae:3")])
def test_lower_variance_away_from_the_posterior(variant: str, base: str) -> None:
    """Away from the posterior (AWAY) the guide-gradient variance is below the base estimator's:
    ratio < 0.7. Measured over seeds 0-7 (2000 rows per point): STL/trace (2 particles)
    0.42-0.47, DReG-3/IWAE-3 0.25-0.28; the bound is about 8 spreads away."""
    ratio = _encoder_variance(estimator_gradients(variant, AWAY, copies=2000)) / _encoder_variance(
        estimator_gradients(base, AWAY, copies=2000)
    )
    assert ratio < 0.7, f"variance ratio {variant}/{base} = {ratio:.3f}"


# --------------------------------------------------------------------------- hierarchical guides


class ChainModel(PyroModule):
    r"""A two-level chain.

    .. math:: z_1 \sim N(0, I), \quad z_2 \mid z_1 \sim N(z_1, I), \quad x \mid z_2 \sim N(z_2, I)
    """

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z2, 1.0).to_event(1), obs=x)


class ChainGuide(PyroModule):
    r"""A hierarchical guide whose second site's location depends on the first site's value.

    .. math:: q(z_1 \mid x) = N(a_1 x + b_1, c_1^2), \; q(z_2 \mid z_1, x) = N(g z_1 + h x, c_2^2)

    The exact posterior is a_1 = 1/3, b_1 = 0, c_1 = sqrt(2/3), g = h = 1/2, c_2 = sqrt(1/2).
    """

    def __init__(self, values: dict[str, float], n: int) -> None:
        super().__init__()
        for key, value in values.items():
            setattr(self, key, nn.Parameter(torch.full((n, 2), value, dtype=DTYPE)))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            z1 = pyro.sample("z1", dist.Normal(self.a1 * x + self.b1, self.c1).to_event(1))
            pyro.sample("z2", dist.Normal(self.g * z1 + self.h * x, self.c2).to_event(1))


CHAIN_EXACT = {"a1": 1 / 3, "b1": 0.0, "c1": (2 / 3) ** 0.5, "g": 0.5, "h": 0.5, "c2": 0.5**0.5}
CHAIN_AWAY = {"a1": 0.1, "b1": 0.4, "c1": 0.6, "g": 0.8, "h": 0.2, "c2": 0.9}


def _chain_gradients(spec: str, values: dict[str, float], copies: int) -> torch.Tensor:
    x = X_BASE.repeat(copies, 1)
    guide = ChainGuide(values, x.shape[0])
    loss = make_elbo(spec, num_particles=NUM_PARTICLES).differentiable_loss(ChainModel(), guide, x)
    return torch.cat(torch.autograd.grad(loss, list(guide.parameters())), dim=-1)


@pytest.mark.parametrize(("variant", "base"), [("stl", "trace"), ("dreg:3", "iwae:3")])
def test_hierarchical_guide(variant: str, base: str) -> None:
    r"""A guide :math:`q(z_1 \mid x) q(z_2 \mid z_1, x)` exercises the re-run of the guide.

    At the exact posterior every STL/DReG gradient sample is 0 (< 1e-10) — which fails if the
    dependence of :math:`q(z_2 \mid z_1)`'s parameters on :math:`z_1` were dropped; away from
    it the mean gradient equals the base estimator's (5 SE of the difference, 1500 rows/point).
    """
    assert _chain_gradients(variant, CHAIN_EXACT, copies=50).abs().max() < 1e-10
    mean, se = per_point(_chain_gradients(variant, CHAIN_AWAY, copies=1500))
    base_mean, base_se = per_point(_chain_gradients(base, CHAIN_AWAY, copies=1500))
    assert_within(mean, se, base_mean, base_se)


class BernoulliModel(PyroModule):
    r"""A discrete latent: :math:`y \sim \mathrm{Bernoulli}(0.3)`, :math:`x \mid y \sim N(2y, 1)`."""

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            y = pyro.sample("y", dist.Bernoulli(torch.full_like(x, 0.3)))
            pyro.sample("x", dist.Normal(2 * y, 1.0), obs=x)


class BernoulliGuide(PyroModule):
    r""":math:`q(y \mid x) = \mathrm{Bernoulli}(\sigma(u x + v))`, one (u, v) per row; the
    score-function term gets a fixed baseline (Pyro's ``baseline_value``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.full((n,), 0.8, dtype=DTYPE))
        self.v = nn.Parameter(torch.full((n,), -0.3, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            baseline = {"baseline": {"baseline_value": torch.full_like(x, -1.5)}}
            pyro.sample("y", dist.Bernoulli(logits=self.u * x + self.v), infer=baseline)


@pytest.mark.parametrize("spec", ["trace", "tracegraph"])
def test_score_function_gradient(spec: str) -> None:
    r"""With a non-reparameterisable latent the gradient is the score-function one: its mean
    equals the exact ELBO gradient, summed over :math:`y \in \{0, 1\}` (5 SE, 4000 rows/point);
    for ``tracegraph`` it also equals Pyro's own ``TraceGraph_ELBO.loss_and_grads`` (baseline
    terms included) on the same samples, to 1e-12, with the same value."""
    x = torch.tensor([0.4, 1.7, -0.5], dtype=DTYPE).repeat(4000)
    guide, model = BernoulliGuide(x.shape[0]), BernoulliModel()
    pyro.set_rng_seed(7)
    loss = make_elbo(spec).differentiable_loss(model, guide, x)
    samples = torch.stack(torch.autograd.grad(loss, [guide.u, guide.v]), dim=-1)
    mean, se = per_point(samples)

    q1 = torch.sigmoid(guide.u * x + guide.v)
    exact_elbo = sum(
        q * (math.log(p) + torch.distributions.Normal(2.0 * y, 1.0).log_prob(x) - torch.log(q))
        for y, q, p in ((1, q1, 0.3), (0, 1 - q1, 0.7))
    )
    exact = torch.stack(torch.autograd.grad(-exact_elbo.sum(), [guide.u, guide.v]), dim=-1)
    ref = exact.reshape(-1, 3, 2)[0]
    assert_within(mean, se, ref, torch.zeros_like(ref))
    assert (ref.abs() > 5 * se).all()
    if spec == "tracegraph":
        pyro.set_rng_seed(7)
        value = pyro.infer.TraceGraph_ELBO().loss_and_grads(model, guide, x)
        theirs = torch.stack([guide.u.grad, guide.v.grad], dim=-1)
        torch.testing.assert_close(samples, theirs, rtol=1e-12, atol=1e-12)
        assert loss.item() == pytest.approx(value, rel=1e-12)


@pytest.mark.parametrize("spec", ["stl", "dreg:3"])
def test_requires_reparameterised_guide(spec: str) -> None:
    """A latent site without rsample (Bernoulli) is rejected with a ConfigError naming it."""

    def guide(x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Bernoulli(torch.full_like(x, 0.5)).to_event(1))

    model = ConjugateModel(torch.ones(3, 1, dtype=DTYPE))
    with pytest.raises(ConfigError, match="site 'z'"):
        make_elbo(spec).differentiable_loss(model, guide, X_BASE)


def test_sequential_renyi_equals_pyro_gradient() -> None:
    """DifferentiableRenyi_ELBO's gradient is Pyro's RenyiELBO.loss_and_grads' on the same samples
    (same seed; 1e-12), and IWAE_ELBO is its alpha = 0 case."""
    model, guide, x = make_pair(AWAY, 5)
    pyro.set_rng_seed(5)
    loss = DifferentiableRenyi_ELBO(alpha=0.3, num_particles=3).differentiable_loss(model, guide, x)
    ours = row_gradients(loss, model, guide)

    def guide_with_param_site(x: torch.Tensor) -> None:
        # Pyro's loss_and_grads only differentiates when the trace holds a "param" site
        pyro.param("unused", torch.zeros(()))
        guide(x)

    pyro.set_rng_seed(5)
    value = pyro.infer.RenyiELBO(alpha=0.3, num_particles=3).loss_and_grads(
        model, guide_with_param_site, x
    )
    theirs = torch.cat([guide.a.grad, guide.b.grad, guide.c.grad, model.w.grad], dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    assert IWAE_ELBO().alpha == 0.0


class _NonReparamNormal(dist.Normal):
    """A Normal that Pyro must treat as non-reparameterisable (score-function gradients)."""

    has_rsample = False


class ScoreFunctionConjugateGuide(ConjugateGuide):
    """:class:`ConjugateGuide` whose ``z`` has no ``rsample``: every estimator takes its
    score-function branch for ``z``."""

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", _NonReparamNormal(self.a * x + self.b, self.c).to_event(1))


def closed_form_renyi(point: dict, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The exact Rényi objective of the conjugate pair and the gradient of its negative, per
    point ((3,) and (3, 7)).

    .. math:: \mathcal{L}_\alpha = \frac{1}{1-\alpha} \log \int p(x, z)^{1-\alpha}\,
        q(z \mid x)^\alpha\, dz

    Per dimension the integrand is :math:`\exp(c_0 - \tfrac12 P z^2 + h z)` with
    :math:`P = (1-\alpha)(1 + w^2/s^2) + \alpha/c^2`, :math:`h = (1-\alpha) w x / s^2 +
    \alpha m / c^2`, so the integral is :math:`e^{c_0} \sqrt{2\pi/P}\, e^{h^2/(2P)}`.
    """
    model, guide, x = make_pair(point, 1)
    a, b, c, w = guide.a, guide.b, guide.c, model.w
    s2 = NOISE_SCALE**2
    m = a * x + b
    precision = (1 - alpha) * (1 + w**2 / s2) + alpha / c**2
    h = (1 - alpha) * w * x / s2 + alpha * m / c**2
    c0 = (1 - alpha) * (-0.5 * math.log(2 * math.pi) - 0.5 * math.log(2 * math.pi * s2)
                        - x**2 / (2 * s2))  # fmt: skip
    c0 = c0 + alpha * (-0.5 * torch.log(2 * math.pi * c**2) - m**2 / (2 * c**2))
    log_integral = c0 + 0.5 * torch.log(2 * math.pi / precision) + h**2 / (2 * precision)
    objective = log_integral.sum(-1) / (1 - alpha)
    return objective.detach(), row_gradients(-objective.sum(), model, guide)


def test_closed_form_renyi_objective_agrees_with_monte_carlo() -> None:
    r"""The closed form above against a plain-torch Monte Carlo of the same integral
    (:math:`K = 2 \cdot 10^5` reparameterised samples; its bias, O(1/K), and spread are
    ~3e-3 nats here): within 0.02 nats, and the alpha -> 0 limit is log p(x) exactly."""
    value, _ = closed_form_renyi(AWAY, 0.5)
    _, _, mc = mc_renyi_rows(AWAY, 0.5, 200_000, copies=1)
    torch.testing.assert_close(mc.detach(), value, rtol=0, atol=0.02)
    limit, _ = closed_form_renyi(AWAY, 0.0)
    torch.testing.assert_close(limit, exact_log_evidence(AWAY, X_BASE), rtol=1e-12, atol=1e-12)


def test_renyi_score_function_gradient_matches_the_closed_form() -> None:
    r"""The score-function branch of :class:`DifferentiableRenyi_ELBO` (a guide site without
    ``rsample``) against the gradient of the exact objective :math:`\mathcal{L}_\alpha`.

    At such a site the estimator's gradient (Pyro's surrogate
    :math:`\tfrac{\alpha}{1-\alpha} \sum_k \tilde w_k \nabla \log q(z_k)`, with normalised
    weights :math:`\tilde w_k \propto w_k^{1-\alpha}`) is the self-normalised importance-sampling
    estimate of :math:`\nabla \mathcal{L}_\alpha = \tfrac{\alpha}{1-\alpha}
    E_q[w^{1-\alpha} \nabla \log q] / E_q[w^{1-\alpha}]`: consistent in K with an O(1/K) bias,
    not an unbiased gradient of the K-particle bound. With K = 1000 particles and 500 rows per
    point the bias is below 0.1 standard error (measured: at K = 100 it reaches ~2 SE, and
    shrinks as 1/K), so the mean must lie within 5 SE of the closed form for every point and
    parameter (guide a, b, c through the score function; model w pathwise). A flipped sign of
    the score-function term flips the guide's gradient, which is 5-100 SE from zero.
    """
    alpha = 0.5
    _, ref = closed_form_renyi(AWAY, alpha)
    model, pathwise, x = make_pair(AWAY, 500)
    guide = ScoreFunctionConjugateGuide(
        *(p.detach().clone() for p in (pathwise.a, pathwise.b, pathwise.c))
    )
    elbo = DifferentiableRenyi_ELBO(alpha=alpha, num_particles=1000, vectorize_particles=True,
                                    max_plate_nesting=1)  # fmt: skip
    loss = elbo.differentiable_loss(model, guide, x)
    mean, se = per_point(row_gradients(loss, model, guide))
    assert_within(mean, se, ref, torch.zeros_like(ref))
    assert (ref[:, :6].abs() > 5 * se[:, :6]).all()  # guide gradients: far from zero


# --------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iwae:5", ("iwae", 5.0)),
        ("renyi:0.5", ("renyi", 0.5)),
        ("renyi:-2", ("renyi", -2.0)),
        ("trace", ("trace", None)),
        (" DReG : 7 ", ("dreg", 7.0)),
        ("dreg", ("dreg", None)),
    ],
)
def test_parse_estimator(spec: str, expected: tuple) -> None:
    assert parse_estimator(spec) == expected


def test_unknown_estimator_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_estimator("trcae")
    assert str(info.value) == f"Unknown estimator 'trcae'; expected one of {estimator_names()}"
    assert "'dreg', 'enum', 'iwae', 'meanfield', 'renyi', 'stl', 'trace', 'tracegraph'" in str(
        info.value
    )
    with pytest.raises(ConfigError, match="Unknown estimator"):
        make_elbo("trcae:3")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("iwae:0", "must be a positive integer, got '0'"),
        ("iwae:2.5", "must be a positive integer, got '2.5'"),
        ("dreg:-3", "must be a positive integer, got '-3'"),
        ("renyi:1", "must not be 1"),
        ("renyi:x", r"expects a number \(alpha\) after ':', got 'x'"),
        ("renyi:nan", "must be finite"),
        ("trace:3", "takes no argument"),
    ],
)
def test_bad_estimator_argument(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_elbo(spec)


def test_make_elbo_options() -> None:
    """num_particles / vectorize_particles / max_plate_nesting reach every estimator; K from the
    spec wins for iwae and dreg; defaults alpha = 0.5 and K = 5 (also for renyi: one particle
    would make every Renyi bound the ELBO)."""
    for name in estimator_names():
        elbo = make_elbo(name, num_particles=4, vectorize_particles=False, max_plate_nesting=2)
        assert elbo.num_particles == 4 and elbo.vectorize_particles is False
        assert elbo.max_plate_nesting == 2
        assert callable(elbo.differentiable_loss)
        vectorized = make_elbo(name, num_particles=4, vectorize_particles=True)
        assert vectorized.vectorize_particles and vectorized.max_plate_nesting == 2  # +1 particles
    iwae = make_elbo("iwae:7", num_particles=3)
    assert isinstance(iwae, IWAE_ELBO) and iwae.num_particles == 7 and iwae.vectorize_particles
    dreg = make_elbo("dreg")
    assert isinstance(dreg, TraceDReG_ELBO) and dreg.num_particles == 5
    renyi = make_elbo("renyi")
    assert renyi.alpha == 0.5 and renyi.num_particles == 5 and renyi.vectorize_particles
    assert isinstance(make_elbo("stl"), TraceSTL_ELBO)
    for bad in ({"num_particles": 0}, {"vectorize_particles": "yes"}, {"max_plate_nesting": -1}):
        with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
            make_elbo("trace", **bad)


def test_backward_without_param_sites() -> None:
    """loss_and_grads of STL/DReG/Rényi differentiates under module_local_params (no param
    sites), unlike Pyro's RenyiELBO."""
    for spec in ("stl", "dreg:3", "renyi:0.5"):
        model, guide, x = make_pair(AWAY, 2)
        make_elbo(spec, num_particles=2).loss_and_grads(model, guide, x)
        assert guide.a.grad is not None and model.w.grad is not None


# --------------------------------------------------------------------------- log-likelihood


def test_log_likelihood_bounds_and_convergence() -> None:
    r"""With 200 independent estimates per point (rows):

    * at K = 1000 the mean estimate is within 5 SE (+ 0.005 nats for the O(1/K) bias of the
      log of a mean) of the exact :math:`\log p(x)`;
    * it is above the closed-form ELBO on average over the data, by more than 5 SE;
    * its mean is non-decreasing in K = 1, 10, 100, 1000 (each step >= -3 SE of the difference).
    """
    model, guide, x = make_pair(AWAY, 200)
    exact = exact_log_evidence(AWAY, x)
    elbo = closed_form_elbo(AWAY, x)
    means, ses = [], []
    for k in (1, 10, 100, 1000):
        estimate = log_likelihood(model, guide, x, num_samples=k, chunk_size=500)
        assert estimate.shape == (x.shape[0],) and not estimate.requires_grad
        error = estimate - exact
        means.append(error.mean())
        ses.append(error.std() / len(error) ** 0.5)
    for i in range(3):
        assert means[i + 1] >= means[i] - 3 * (ses[i] ** 2 + ses[i + 1] ** 2).sqrt()
    assert means[-1].abs() < 5 * ses[-1] + 0.005
    gap = estimate - elbo
    assert gap.mean() > 5 * gap.std() / len(gap) ** 0.5
    assert means[0] < means[-1]  # K = 1 is the ELBO-level estimate, well below K = 1000


def test_log_likelihood_chunk_sizes_agree() -> None:
    """Chunk sizes 1000, 100 and 7 (a remainder chunk) give the same estimate within Monte Carlo
    error (5 SE of each difference, 100 estimates per point at K = 300)."""
    model, guide, x = make_pair(AWAY, 100)
    estimates = [
        log_likelihood(model, guide, x, num_samples=300, chunk_size=size) for size in (1000, 100, 7)
    ]
    for other in estimates[1:]:
        mean_a, se_a = per_point(estimates[0])
        mean_b, se_b = per_point(other)
        assert_within(mean_a, se_a, mean_b, se_b)


def test_log_likelihood_uses_chunks() -> None:
    """Memory is bounded by the chunk: the model never sees more than chunk_size particles, and
    the chunks cover num_samples exactly (100 + 100 + 50)."""
    model, guide, x = make_pair(AWAY, 2)
    log_likelihood(model, guide, x, num_samples=250, chunk_size=100)
    assert model.particle_dims == [100, 100, 50]


def test_log_likelihood_ignores_poutine_scale() -> None:
    """poutine.scale(0.1) on z in model and guide (KL warm-up) leaves log_likelihood unchanged
    (same seed, same samples: equal to 1e-12), although it changes the ELBO."""
    results, losses = [], []
    for scale in (None, 0.1):
        model, guide, x = make_pair(AWAY, 3, scale_z=scale)
        pyro.set_rng_seed(11)
        results.append(log_likelihood(model, guide, x, num_samples=50, chunk_size=20))
        pyro.set_rng_seed(11)
        losses.append(pyro.infer.Trace_ELBO().loss(model, guide, x))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    assert abs(losses[0] - losses[1]) > 1.0


def test_log_likelihood_errors() -> None:
    model, guide, x = make_pair(AWAY, 1)
    for bad in ({"num_samples": 0}, {"chunk_size": 2.5}, {"max_plate_nesting": 0}):
        with pytest.raises(ConfigError, match=f"`{next(iter(bad))}`"):
            log_likelihood(model, guide, x, **bad)

    def no_plate_model(x: torch.Tensor) -> None:
        pyro.sample("x", dist.Normal(0.0, 1.0).expand(x.shape).to_event(2), obs=x)

    def no_plate_guide(x: torch.Tensor) -> None:
        pass

    with pytest.raises(ConfigError, match=r"pyro.plate\('data'\)"):
        log_likelihood(no_plate_model, no_plate_guide, x, num_samples=2)


def test_meanfield_warns_once_when_it_falls_back_to_monte_carlo():
    import warnings

    import pyro.distributions as dist

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.StudentT(3.0, torch.zeros(2), torch.ones(2)).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.StudentT(4.0, x, torch.ones(2)).to_event(1))

    def normal_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def normal_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))

    x = torch.randn(5, 2)
    elbo = make_elbo("meanfield")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            elbo.differentiable_loss(model, guide, x)
        elbo.differentiable_loss(normal_model, normal_guide, x)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "KL(StudentT || StudentT) at site 'z'" in messages[0] and "Monte Carlo" in messages[0]
