"""The VAE fast path (``ppl_vae.inference.fastpath``) where the mutation run of 2026-12-03 found
it unchecked: which steps it serves (particles, vectorisation, a KL weight above 1, a batch whose
plate scale rounds differently from the data dimension's), the reason it records for each
structure it refuses (``FastELBOLoss.reason``, exact text), its documented defaults and
attributes, validation in fast steps, and the error when q(z|x) changes type between particles.

Values are compared with Pyro's own ``elbo.differentiable_loss`` on the same draws (the
independent computation), as in ``tests/test_fastpath.py``.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import TorchDistributionMixin
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from ppl_vae.inference.estimators import make_elbo
from ppl_vae.inference.fastpath import (
    FastELBOLoss,
    _set_torch_rng_state,
    _torch_rng_state,
    build_loss,
    served_estimator,
)
from ppl_vae.vae import build_vae

#: 0.7 * 4 / 4 is 0.7, but 0.7 * 12 / 12 and 0.7 * 4 / 4 * 3 / 3 are 0.6999999999999998: the
#: expected scale of site z must be computed from the batch (not the data) dimension and with
#: the particle plate exactly when Pyro adds one.
BATCH, DATA_DIM = 4, 12


def _vae(prior: str = "gaussian", kl_scale: float = 0.7):
    torch.manual_seed(0)
    vae = build_vae(
        (DATA_DIM,), prior=prior, likelihood="bernoulli", latent_dim=3, hidden_dims=(8,)
    )
    vae.kl_scale = kl_scale
    return vae


def _data() -> torch.Tensor:
    return torch.bernoulli(torch.full((BATCH, DATA_DIM), 0.4))


def _value_and_grads(vae, fn, x):
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(11)
    loss = fn(x)
    loss.backward()
    return loss.detach(), {
        n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None
    }


@pytest.mark.filterwarnings("ignore:meanfield. no KL is registered:UserWarning")
@pytest.mark.parametrize("kl_scale", [0.7, 2.0])
@pytest.mark.parametrize(
    "num_particles, vectorize", [(1, False), (1, True), (2, True), (3, False), (3, True)]
)
@pytest.mark.parametrize(
    "spec, prior", [("trace", "gaussian"), ("meanfield", "gaussian"), ("meanfield", "mixture")]
)
def test_the_fast_path_serves_and_equals_pyro(spec, prior, num_particles, vectorize, kl_scale):
    """Served (no reason) on the first step, then each fast step equals Pyro's on the same draws:
    the meanfield rows take the analytic KL (gaussian) and the Monte Carlo one (mixture)."""
    torch.manual_seed(1)
    x = _data()
    vae = _vae(prior, kl_scale)
    elbo = make_elbo(spec, num_particles, vectorize, max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    loss(x)
    assert loss.reason == "" and loss.fast is True
    fast_value, fast_grads = _value_and_grads(vae, loss, x)
    assert loss.steps["fast"] == 2
    pyro_value, pyro_grads = _value_and_grads(
        vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x
    )
    torch.testing.assert_close(fast_value, pyro_value, rtol=1e-6, atol=1e-5)
    assert fast_grads.keys() == pyro_grads.keys()
    for name, g in pyro_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_pyros_own_meanfield_class_is_served_with_the_analytic_kl():
    torch.manual_seed(1)
    x = _data()
    vae = _vae()
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    assert loss.kind == "meanfield"
    loss(x)
    fast_value, _ = _value_and_grads(vae, loss, x)
    pyro_value, _ = _value_and_grads(
        vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x
    )
    torch.testing.assert_close(fast_value, pyro_value, rtol=1e-6, atol=1e-5)


def test_served_estimators_and_the_documented_defaults():
    assert served_estimator(Trace_ELBO()) == "trace"
    assert served_estimator(TraceMeanField_ELBO()) == "meanfield"
    assert served_estimator(make_elbo("meanfield")) == "meanfield"
    vae = _vae()
    loss = FastELBOLoss(Trace_ELBO(), vae)
    assert (loss.kind, loss.validate, loss.reason, loss.fast) == ("trace", False, "", None)
    assert build_loss(Trace_ELBO(), vae).validate is False
    assert build_loss(Trace_ELBO(), vae, validate=True).validate is True
    with pytest.raises(TypeError) as info:
        FastELBOLoss(TraceEnum_ELBO(), vae)
    assert str(info.value) == "the fast path does not serve TraceEnum_ELBO"


def test_a_vae_whose_programs_are_replaced_on_the_instance_is_left_to_pyro():
    for attr in ("model", "guide"):
        vae = _vae()
        setattr(vae, attr, getattr(vae, attr))  # an instance attribute shadows the method
        assert not isinstance(build_loss(Trace_ELBO(), vae), FastELBOLoss), attr


def test_fast_steps_skip_pyros_argument_checks_unless_asked():
    """Off by default (speed); ``validate=True`` keeps them: x = 0.5 is outside a Bernoulli's
    support, which only the validated fast step refuses."""
    torch.manual_seed(1)
    x = _data()
    half = torch.full_like(x, 0.5)
    for validate in (False, True):
        loss = build_loss(Trace_ELBO(), _vae(), validate=validate)
        loss(x)
        assert loss.fast
        if validate:
            with pytest.raises(ValueError):
                loss(half)
        else:
            assert torch.isfinite(loss(half))


def test_pyro_steps_before_the_probe_are_counted():
    torch.manual_seed(1)
    x = _data()
    vae = _vae(kl_scale=0.0)
    loss = build_loss(Trace_ELBO(), vae)
    with pytest.raises(ValueError, match="scale > 0"):
        loss(x)  # a non-positive KL weight goes to Pyro, which refuses it
    vae.kl_scale = 0.7
    loss(x)
    assert loss.steps == {"fast": 1, "pyro": 2}


def test_q_changing_type_between_the_particles_of_a_step_is_an_error():
    torch.manual_seed(1)
    x = _data()
    vae = _vae()
    loss = build_loss(Trace_ELBO(num_particles=2), vae)
    loss(x)
    assert loss.fast

    class Flip(torch.nn.Module):  # the second particle's q(z|x) is a full-covariance Gaussian
        def __init__(self, encoder):
            super().__init__()
            self.encoder, self.calls = encoder, 0

        def forward(self, x):
            self.calls += 1
            q = self.encoder(x)
            if self.calls % 2 == 0:
                return dist.MultivariateNormal(q.mean, scale_tril=torch.diag_embed(q.stddev))
            return q

    vae.encoder = Flip(vae.encoder)
    with pytest.raises(RuntimeError) as info:
        loss(x)
    assert str(info.value) == (
        "q(z|x) or p(z) changed type between the particles of one step: MultivariateNormal, "
        "Independent"
    )


# ----------------------------------------------------------------------- the refusal reasons


def _reason(model, guide):
    """``FastELBOLoss._check`` on the traces of a hand-written model and guide."""
    x = _data()
    loss = FastELBOLoss(Trace_ELBO(), _vae(kl_scale=1.0))
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return loss._check(model_trace, guide_trace, x), loss


def _q(x):
    return dist.Normal(torch.zeros(x.shape[0], 3), 1.0).to_event(1)


def _p():
    return dist.Normal(torch.zeros(3), 1.0).to_event(1)


def _engine_like(
    *,
    guide_sites=("z",),
    model_sites=("z", "x"),
    observe=None,
    mask=None,
    scale=None,
    outside=None,
    enumerate_=None,
    q=None,
):
    """A model/guide with the engine's structure, changed at one place."""
    observe = observe or {"x"}
    mask = mask or {}
    scale = scale or {}

    def sample(where, name, fn, x):
        key = f"{where}:{name}"
        kwargs = {"obs": x if name in observe else None}
        if enumerate_ == key:
            kwargs["infer"] = {"enumerate": "parallel"}
        masked = poutine.mask(mask=mask[key]) if key in mask else contextlib.nullcontext()
        with poutine.scale(scale=scale.get(key, 1.0)), masked:
            return pyro.sample(name, fn, **kwargs)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            for name in guide_sites:
                if name != "z":
                    sample("guide", name, _q(x), None)
                elif outside != "guide:z":
                    sample("guide", "z", (q or _q)(x), None)
        if outside == "guide:z":
            sample("guide", "z", _q(x), None)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            for name in model_sites:
                if name == "x":
                    sample("model", "x", dist.Bernoulli(torch.full_like(x, 0.5)).to_event(1), x)
                else:
                    sample("model", name, _p(), x)

    return model, guide


class _PartlyReparameterised(dist.Independent):
    """Score parts with a score-function term as well (Pyro's ``Independent`` itself does not
    pass its base's on, so the override is on the outer class)."""

    def score_parts(self, value, *args, **kwargs):
        log_prob = self.log_prob(value)
        return ScoreParts(log_prob=log_prob, score_function=log_prob, entropy_term=log_prob)


def test_the_engines_structure_has_no_reason_and_records_the_types():
    reason, loss = _reason(*_engine_like())
    assert reason == ""
    assert loss._guide_type is dist.Independent


def test_an_expanded_q_records_its_base_type():
    """A q(z|x) without its own ``expand`` is wrapped by the plate: the type kept is the base's."""

    def q(x):
        return dist.ExpandedDistribution(
            dist.Normal(torch.zeros(3), 1.0).to_event(1), (x.shape[0],)
        )

    reason, loss = _reason(*_engine_like(q=q))
    assert reason == ""
    assert loss._guide_type is dist.Independent


BOOL_MASK = torch.tensor([True, False, True, True])


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"guide_sites": ("z", "w")}, "guide sample sites are ['z', 'w'], not ['z']"),
        ({"model_sites": ("z",)}, "model sample sites are ['z'], not ['z', 'x']"),
        ({"observe": {"x", "z"}}, "site 'z' must be latent and site 'x' observed"),
        ({"mask": {"guide:z": BOOL_MASK}}, "guide site 'z' is masked"),
        ({"mask": {"model:z": BOOL_MASK}}, "model site 'z' is masked"),
        ({"mask": {"model:x": BOOL_MASK}}, "model site 'x' is masked"),
        ({"scale": {"model:x": 2.0}}, "model site 'x' has scale 2.0, expected 1.0"),
        ({"scale": {"guide:z": 0.5}}, "guide site 'z' has scale 0.5, expected 1.0"),
        ({"outside": "guide:z"}, "guide site 'z' is in plates [], expected ['data']"),
        ({"enumerate_": "guide:z"}, "guide site 'z' is enumerated"),
        (
            {"q": lambda x: dist.Bernoulli(torch.full((x.shape[0], 3), 0.5)).to_event(1)},
            "guide site 'z' (Independent) has no rsample (score-function gradient)",
        ),
        (
            {
                "q": lambda x: _PartlyReparameterised(
                    dist.Normal(torch.zeros(x.shape[0], 3), 1.0), 1
                )
            },
            "guide site 'z' (_PartlyReparameterised) overrides score_parts",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_each_refused_structure_is_named(change, reason):
    assert _reason(*_engine_like(**change))[0] == reason


def test_the_observed_x_must_be_the_batch_passed_to_the_loss():
    model, guide = _engine_like()
    x = _data()
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x.clone())
    loss = FastELBOLoss(Trace_ELBO(), _vae(kl_scale=1.0))
    assert loss._check(model_trace, guide_trace, x) == (
        "site 'x' does not observe the data passed to the loss"
    )


class _NoExpand(dist.Independent):
    """A q(z|x) class without its own ``expand``: the vectorised particle plate wraps it in an
    ``ExpandedDistribution``, at Pyro's probe step and at every fast step."""

    expand = TorchDistributionMixin.expand


class _NoExpandEncoder(torch.nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return _NoExpand(self.encoder(x).base_dist, 1)


def test_an_expanded_q_is_served_under_vectorised_particles():
    torch.manual_seed(1)
    x = _data()
    vae = _vae()
    vae.encoder = _NoExpandEncoder(vae.encoder)
    elbo = make_elbo("trace", 3, True, max_plate_nesting=1)
    loss = build_loss(elbo, vae)
    loss(x)
    assert loss.reason == "" and loss._guide_type is _NoExpand
    fast_value, _ = _value_and_grads(vae, loss, x)
    assert loss.steps == {"fast": 2, "pyro": 1}  # the second step was served too
    pyro_value, _ = _value_and_grads(
        vae, lambda x: elbo.differentiable_loss(vae.model, vae.guide, x), x
    )
    torch.testing.assert_close(fast_value, pyro_value, rtol=1e-6, atol=1e-5)


def test_the_random_state_of_a_cuda_device_is_saved_and_rewound_on_that_device(monkeypatch):
    """The CUDA branch of the helpers the probes and fall-backs rewind with, against a fake
    ``torch.cuda`` (no GPU here): the generator of the device asked for, not the current one;
    on a CPU, CUDA is never touched and only the CPU generator is rewound."""
    calls = []

    def get(device="cuda"):
        calls.append(("get", device))
        return torch.tensor([7, 1], dtype=torch.uint8)

    def set_(new_state, device="cuda"):
        calls.append(("set", new_state.tolist(), device))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_)
    for device in (torch.device("cuda", 1), torch.device("cpu")):
        calls.clear()
        before = torch.get_rng_state()
        state = _torch_rng_state(device)
        torch.rand(3)
        _set_torch_rng_state(state, device)
        assert torch.equal(torch.get_rng_state(), before)
        if device.type == "cuda":
            assert calls == [("get", device), ("set", [7, 1], device)]
        else:
            assert state[1] is None and calls == []
