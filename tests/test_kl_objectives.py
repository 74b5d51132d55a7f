"""Free bits, beta schedules and early stopping against computations by hand."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from ppl_vae import ConfigError, build_vae, fit
from ppl_vae.cli import main
from ppl_vae.inference.free_bits import FreeBitsLoss
from ppl_vae.training.schedules import make_beta_schedule

TINY = dict(hidden_dims=[32], latent_dim=4, log_likelihood_samples=8, quiet=True, max_train=300)


def _vae(prior="gaussian"):
    torch.manual_seed(0)
    return build_vae((6,), prior=prior, latent_dim=3, hidden_dims=(8,), likelihood="bernoulli")


def _hand_gaussian(vae, x, lam, beta, seed):
    """J = -sum_i log p(x_i|z_i) + beta sum_d max(N lam, sum_i KL_id), KL_id in closed form."""
    pyro.set_rng_seed(seed)
    q = vae.encoder(x)
    mu, sigma = q.base_dist.loc, q.base_dist.scale
    z = q.rsample()  # the guide's one draw, from the same state
    logits = vae.decoder(z).reshape(x.shape)
    recon = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum()
    kl_id = 0.5 * (mu**2 + sigma**2 - 1) - sigma.log()  # KL(N(mu, s^2) || N(0, 1))
    totals = kl_id.sum(0)
    floored = torch.maximum(totals, torch.full_like(totals, len(x) * lam))
    return -recon + beta * floored.sum(), totals


def test_free_bits_value_and_gradient_equal_the_hand_computation():
    vae = _vae()
    x = torch.bernoulli(torch.full((7, 6), 0.4), generator=torch.Generator().manual_seed(1))
    _, totals = _hand_gaussian(vae, x, 0.0, 1.0, seed=3)
    t = totals.detach().sort().values
    lam = float(t[0] + t[1]) / 2 / len(x)  # one dimension below the floor, two above
    beta = 0.7
    pyro.set_rng_seed(3)
    loss = FreeBitsLoss(vae.model, vae.guide, lam)(x, beta)
    hand, totals = _hand_gaussian(vae, x, lam, beta, seed=3)
    assert int((totals < len(x) * lam).sum()) == 1 and int((totals > len(x) * lam).sum()) == 2
    torch.testing.assert_close(loss, hand, rtol=1e-6, atol=1e-6)
    params = list(vae.parameters())
    g_loss = torch.autograd.grad(loss, params)
    g_hand = torch.autograd.grad(hand, params)
    for a, b in zip(g_loss, g_hand, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # below the floor a dimension's KL has no gradient: the head's loc bias of that dimension
    # is moved by the reconstruction term alone (an unfloored loss moves it more)
    below = int(torch.argmin(totals))
    bias = vae.encoder.head.bias
    pyro.set_rng_seed(3)
    g_floor = torch.autograd.grad(FreeBitsLoss(vae.model, vae.guide, lam)(x, beta), bias)[0]
    recon_only, _ = _hand_gaussian(vae, x, 1e9, beta, seed=3)  # every KL below the floor
    g_recon = torch.autograd.grad(recon_only, bias)[0]
    assert float(g_floor[below]) == pytest.approx(float(g_recon[below]), rel=1e-5, abs=1e-7)


def test_a_site_that_does_not_factorise_is_one_group_with_a_floor_of_d_lambda():
    vae = _vae("mixture")
    x = torch.bernoulli(torch.full((5, 6), 0.4), generator=torch.Generator().manual_seed(2))
    lam = 10.0  # far above any KL here: the floor binds
    pyro.set_rng_seed(4)
    loss = FreeBitsLoss(vae.model, vae.guide, lam)(x, 1.0)
    pyro.set_rng_seed(4)
    z = vae.encoder(x).rsample()
    logits = vae.decoder(z).reshape(x.shape)
    recon = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum()
    torch.testing.assert_close(loss, -recon + 5 * 3 * lam, rtol=1e-6, atol=1e-5)


def test_free_bits_trains_and_only_with_a_pathwise_elbo(capsys):
    r = fit(epochs=2, free_bits=0.5, **TINY)
    assert math.isfinite(r.metrics["test_log_likelihood"])
    # with a floor of 0.5 nats on each of 4 dimensions, the training objective is at least the
    # floor above the reconstruction term (history: train loss per point)
    assert r.history[-1]["train_loss"] >= -r.history[-1]["recon"] + 4 * 0.5 - 1.0
    code = main(["fit", "--free-bits", "0.5", "--estimator", "iwae:3", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "use estimator trace or meanfield" in err
    assert len(err.strip().splitlines()) == 1


def test_cyclical_schedule_by_hand():
    s = make_beta_schedule("cyclical", {"cycles": 2, "ratio": 0.5}, 0.0)
    total = 20  # two cycles of 10 steps: rises over 5 steps, then 1
    expected = [min(1.0, ((t % 10) + 1) / 10 / 0.5) for t in range(total)]
    assert [s(t, 5, total) for t in range(total)] == pytest.approx(expected)
    assert expected[:6] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0]) and expected[10] == 0.2


def test_linear_schedule_is_the_warm_up():
    s = make_beta_schedule("linear", {}, 2.0)
    assert [s(t, 3, 30) for t in range(8)] == pytest.approx(
        [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1]
    )


def test_a_users_schedule_from_a_file_is_recorded_and_resumes(tmp_path):
    f = tmp_path / "sched.py"
    f.write_text("def half_then_full(step, total_steps, at=0.5):\n"
                 "    return 0.25 if step < at * total_steps else 1.0\n")  # fmt: skip
    spec = f"{f}:half_then_full"
    r = fit(
        epochs=4, beta_schedule=spec, beta_schedule_args={"at": 0.5}, out=tmp_path / "r", **TINY
    )
    assert [h["kl_scale"] for h in r.history] == [0.25, 0.25, 1.0, 1.0]
    assert main(["fit", "--resume", "--epochs", "5", "--out", str(tmp_path / "r"), "--quiet"]) == 0


def test_bad_schedules_are_one_line_errors():
    with pytest.raises(ConfigError, match="drop --warmup-epochs"):
        make_beta_schedule("cyclical", {}, 2.0)
    with pytest.raises(ConfigError, match="no option"):
        make_beta_schedule("cyclical", {"period": 3}, 0.0)
    s = make_beta_schedule(lambda step, total: 0.0, {}, 0.0)
    with pytest.raises(ConfigError, match="must be > 0"):
        s(0, 1, 10)


def test_patience_stops_and_the_best_epoch_is_what_is_evaluated(tmp_path):
    """A learning rate too high to settle: validation peaks early; with patience 2 the run
    stops 2 epochs after its best, evaluates the best weights (best.pt), and a resume trains
    nothing more."""
    from ppl_vae.runs import load_run
    from ppl_vae.training import checkpoint as ckpt

    out = tmp_path / "run"
    r = fit(epochs=40, patience=2, lr=0.05, out=out, **TINY)
    vals = [h["val_elbo"] for h in r.history]
    best = max(range(len(vals)), key=lambda i: (vals[i], i)) + 1
    assert r.metrics["stopped_early"] and len(vals) == best + 2 < 40, vals
    assert r.metrics["best_epoch"] == best
    saved = ckpt.load_state_file(out / ckpt.BEST, torch.device("cpu"))
    assert saved["epoch"] == best
    for name, value in r.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    last = ckpt.load_checkpoint(out, map_location="cpu")
    assert last["epoch"] == best + 2
    assert any(not torch.equal(v, saved["model"][k]) for k, v in last["model"].items())
    assert load_run(out).epoch == best
    assert main(["fit", "--resume", "--out", str(out), "--quiet"]) == 0
    assert ckpt.load_checkpoint(out, map_location="cpu")["epoch"] == best + 2


def test_a_resumed_runs_history_is_bitwise_the_uninterrupted_runs(tmp_path):
    """The first step of a process decides the fast path with Pyro's ELBO (float64 sums); its
    value is then the fast path's of the same draws, so the resumed epoch's train_loss is the
    uninterrupted run's to the last bit (before: 41.75182942708334 against 41.751826171875)."""
    kw = dict(max_train=300, log_likelihood_samples=4, quiet=True, figures=False)
    whole = fit(epochs=3, out=tmp_path / "whole", **kw)
    fit(epochs=1, out=tmp_path / "part", **kw)
    resumed = fit(epochs=3, out=tmp_path / "part", resume=True, quiet=True, figures=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(whole.history)
