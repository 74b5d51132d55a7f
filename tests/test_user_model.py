"""A user's own model/guide pair trained by the one engine (``--model file.py:Class``)."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

from ppl_vae import ConfigError, FitConfig, fit
from ppl_vae.cli import main
from ppl_vae.inference.scoring import score

from .user_models import LinearGaussianChain, TwoLayerVAE

MODELS = Path(__file__).with_name("user_models.py")
SPEC = f"{Path(__file__).resolve().parents[1] / 'examples' / 'own_model.py'}:TwoLayerVAE"
FAST = dict(max_train=300, log_likelihood_samples=8, binarize="dynamic", quiet=True)


def test_a_two_latent_site_model_trains_and_reports_both_sites(tmp_path):
    result = fit(model=SPEC, model_args={"z1": 6, "z2": 3}, epochs=8, out=tmp_path / "run", **FAST)
    history = result.history
    # 8 epochs of Adam: the validation ELBO rises from the untrained model's (about
    # -64 log 2 = -44 nats for Bernoulli digits) by far more than its one-sample noise
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] + 3, history
    m = result.metrics
    assert m["kind"] == "user" and m["latent_sites"] == ["z1", "z2"]
    assert m["test_log_likelihood"] > m["test_elbo"]  # with the next test's exact check
    cfg = FitConfig.load(tmp_path / "run" / "config.toml")
    assert (cfg.model, cfg.model_args, cfg.kind) == (SPEC, {"z1": 6, "z2": 3}, "user")
    assert 'kind = "user"' in (tmp_path / "run" / "config.toml").read_text()
    figs = {p.name for p in (tmp_path / "run" / "figures").iterdir()}
    assert {"elbo.png", "reconstructions.png", "samples.png"} <= figs
    assert isinstance(result.model, TwoLayerVAE)


def test_importance_sampled_log_likelihood_covers_every_latent_site():
    """Closed form: in the linear-Gaussian chain x is Gaussian with a known covariance.

    K = 5000 particles from a guide equal to the prior chain: over 20 points the mean error of
    the estimate was 0.002 nats and the largest 0.07 (measured); the tolerances below are about
    10x and 4x that. Leaving out either latent site's weight, or averaging log-weights instead
    of taking their logsumexp (the ELBO, 10.6 nats below), breaks them by far more.
    """
    model = LinearGaussianChain()
    pyro.set_rng_seed(0)
    x = model.marginal().sample((20,))
    exact = model.marginal().log_prob(x)
    est = score(model, x, num_samples=5000, chunk_size=1000).log_likelihood
    assert float((est - exact).mean().abs()) < 0.02
    assert float((est - exact).abs().max()) < 0.3


def test_the_cli_trains_a_model_file_and_resumes_it_exactly(tmp_path):
    args = ["fit", "--model", SPEC, "--model-arg", "z1=5", "--max-train", "300",
            "--binarize", "dynamic", "--log-likelihood-samples", "4", "--quiet"]  # fmt: skip
    assert main([*args, "--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "part")]) == 0
    assert (
        main(["fit", "--resume", "--epochs", "3", "--out", str(tmp_path / "part"), "--quiet"]) == 0
    )
    whole = (tmp_path / "whole" / "history.csv").read_text().splitlines()
    part = (tmp_path / "part" / "history.csv").read_text().splitlines()
    drop = lambda rows: [",".join(r.split(",")[:-1]) for r in rows]  # noqa: E731 (seconds)
    assert drop(part) == drop(whole)


def test_data_outside_the_models_support_is_a_one_line_usage_error(tmp_path):
    # digits have 17 grey levels; the pair's Bernoulli site needs binary data
    with pytest.raises(ConfigError, match=r"site 'x': the data are outside the support"):
        fit(model=SPEC, epochs=1, max_train=300, quiet=True)


def test_a_guide_that_misses_a_latent_site_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match=r"does not sample \['z2'\]"):
        fit(model=f"{MODELS}:ForgetfulGuide", epochs=1, out=tmp_path / "run", **FAST)


def test_vae_options_with_a_model_are_refused_not_ignored(tmp_path, capsys):
    code = main(["fit", "--model", SPEC, "--prior", "von-mises", "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "do not apply" in err and "'prior'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_beta_scales_every_latent_site_of_the_users_pair():
    """With beta the loss is -E[log p(x|z) + beta (log p(z) - log q(z))]: check it against
    the pieces of one Pyro trace computed by hand."""
    from pyro import poutine

    from ppl_vae.kinds.user import ScaleLatents

    model = TwoLayerVAE((64,), z1=3, z2=2)
    x = torch.bernoulli(torch.full((5, 64), 0.3))
    pyro.set_rng_seed(1)
    guide_tr = poutine.trace(model.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x)
    lp = {n: s["fn"].log_prob(s["value"]).sum() for n, s in model_tr.nodes.items()
          if s["type"] == "sample"}  # fmt: skip
    lq = {n: s["fn"].log_prob(s["value"]).sum() for n, s in guide_tr.nodes.items()
          if s["type"] == "sample"}  # fmt: skip
    beta = 0.25
    by_hand = -(lp["x"] + beta * (lp["z1"] + lp["z2"] - lq["z1"] - lq["z2"]))
    pyro.set_rng_seed(1)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(
        ScaleLatents(beta)(model.model), ScaleLatents(beta)(model.guide), x
    )
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_train_the_users_pair_in_step(tmp_path):
    """Under torchrun the user's pair is DDP-wrapped like the VAE: every rank ends with the
    parameters rank 0 checkpointed, and the run's metrics come from rank 0 alone."""
    from .test_distributed import checkpoint, torchrun

    run = tmp_path / "run"
    r = torchrun(
        ["fit", "--model", SPEC, "--binarize", "dynamic", "--max-train", "256", "--epochs", "2",
         "--log-likelihood-samples", "4", "--device", "cpu", "--quiet", "--out", str(run)],
        dump=tmp_path / "dump",
    )  # fmt: skip
    assert r.stdout.count("test ELBO") == 1
    state = checkpoint(run)["model"]
    for rank in (0, 1):
        dumped = torch.load(tmp_path / "dump" / f"rank{rank}.pt", weights_only=True)
        for k, v in state.items():
            assert torch.equal(dumped[k], v), (rank, k)
    import json

    assert json.loads((run / "metrics.json").read_text())["processes"] == 2


@pytest.mark.slow
def test_compare_runs_on_the_users_pair(tmp_path):
    """`compare` on a two-site model: every estimator trains it, the gradient probe splits the
    guide's parameters from the model's, and the posterior draws hold both latent sites."""
    from ppl_vae import compare_estimators
    from ppl_vae.runs.compare import network_groups

    res = compare_estimators(
        ["trace", "iwae:3"],
        [0],
        out=tmp_path / "cmp",
        isolate=False,
        model=SPEC,
        model_args={"z1": 3, "z2": 2},
        binarize="dynamic",
        max_train=100,
        batch_size=50,
        epochs=2,
        log_likelihood_samples=10,
        device="cpu",
        grad_points=[2],
        grad_repeats=4,
        grad_batch_size=20,
        khat_points=4,
        khat_samples=20,
        posterior_points=2,
        posterior_draws=10,
    )
    assert [r["estimator"] for r in res.rows] == ["trace", "iwae:3"]
    assert all(r["status"] == "ok" and r["snr_encoder_e2"] > 0 for r in res.rows)
    assert set(res.runs[0].posterior_z) == {"z1", "z2"}
    assert (tmp_path / "cmp" / "compare.md").is_file()
    # the probe's groups: the guide's networks and the model's, disjoint, covering everything
    model = TwoLayerVAE((64,), z1=3, z2=2)
    groups = network_groups(model, torch.bernoulli(torch.full((4, 64), 0.3)))
    enc = {id(p) for p in groups["encoder"]}
    assert enc == {id(p) for m in (model.enc_z1, model.enc_z2) for p in m.parameters()}
    dec = {id(p) for p in groups["decoder"]}
    assert dec == {id(p) for m in (model.dec_x, model.dec_z1) for p in m.parameters()}


def test_evaluate_and_sample_reopen_a_user_run(tmp_path):
    from ppl_vae import evaluate, load_run

    run = tmp_path / "run"
    result = fit(model=SPEC, epochs=2, out=run, **FAST)
    reopened = load_run(run, device="cpu")
    assert reopened.kind == "user" and isinstance(reopened.model, TwoLayerVAE)
    for k, v in result.model.state_dict().items():
        assert torch.equal(reopened.model.state_dict()[k], v.cpu()), k
    out = evaluate(run, num_samples=8)
    # same weights, same K, other draws: within a few standard errors of the run's own number
    m = result.metrics
    assert (
        abs(out["test_log_likelihood"] - m["test_log_likelihood"])
        < 5 * m["test_log_likelihood_se"] + 0.5
    ), (out, m)
    assert out["test_bits_per_dim"] is None  # the pair's likelihood is its own
    assert main(["sample", str(run), "-n", "12"]) == 0
    samples = __import__("numpy").load(run / "samples_n12.npy")
    assert samples.shape == (12, 64) and ((samples >= 0) & (samples <= 1)).all()


def test_a_pair_that_asks_for_components_gets_the_ones_the_options_name(tmp_path):
    """``prior``, ``likelihood``, ``hidden_dims`` in the constructor: the engine builds them from
    --prior/--prior-arg/--latent-dim, --likelihood, --hidden-dims, records them, and the run
    reopens with the same components."""
    from ppl_vae.models.likelihoods.bernoulli import BernoulliLikelihood
    from ppl_vae.models.priors.von_mises import VonMisesPrior
    from ppl_vae.runs import load_run

    spec = f"{MODELS}:AsksForComponents"
    out = tmp_path / "run"
    args = ["fit", "--model", spec, "--prior", "von-mises", "--latent-dim", "3",
            "--hidden-dims", "24", "--epochs", "1", "--max-train", "200", "--binarize", "dynamic",
            "--log-likelihood-samples", "4", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    cfg = FitConfig.load(out / "config.toml")
    assert (cfg.prior, cfg.latent_dim, list(cfg.hidden_dims)) == ("von-mises", 3, [24])
    run = load_run(out)
    assert isinstance(run.model.prior, VonMisesPrior) and run.model.prior.latent_dim == 3
    assert isinstance(run.model.likelihood, BernoulliLikelihood)
    assert run.model.dec[0].out_features == 24


def test_an_engine_component_cannot_also_be_a_model_arg(tmp_path, capsys):
    code = main(["fit", "--model", f"{MODELS}:AsksForComponents", "--model-arg", "prior=x",
                 "--out", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "set by the engine" in err and len(err.strip().splitlines()) == 1
