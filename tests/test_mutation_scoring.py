"""Scoring code (``ppl_vae.inference.scoring``) that the mutation run of 2026-12-03 found
unchecked: the memory format, the per-point CSV, ``score``'s documented defaults and refusals,
``mean_elbo`` against Pyro's own one-sample ELBO on the same draws, the standard error with two
points, and bits per dimension for a two-level density."""

from __future__ import annotations

import contextlib
import math
import types
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppl_vae import ConfigError, build_vae
from ppl_vae.inference import scoring
from ppl_vae.inference.scoring import Scores, format_memory, mean_elbo, score, write_scores_csv
from tests.test_mutation_estimators import _Shifted  # log_prob(v, a, b=0) = Normal's - a - b


def test_memory_is_written_in_gib_from_one_gib_and_in_mib_below():
    assert format_memory(2**30) == "1.00 GiB"
    assert format_memory(3 * 2**29) == "1.50 GiB"
    assert format_memory(2**30 - 2**20) == "1023.0 MiB"
    assert format_memory(5 * 2**20 + 2**19) == "5.5 MiB"


def _scores(n=3):
    return Scores(
        torch.tensor([-1.5, -2.25, -3.0])[:n], torch.tensor([-1.0, -2.0, -2.5])[:n], 10, None
    )


def test_the_per_point_csv_with_and_without_labels(tmp_path):
    path = tmp_path / "scores.csv"
    write_scores_csv(path, _scores(), torch.tensor([7, 0, 3]))
    assert path.read_bytes() == (  # bytes: the line ends are "\n", not csv's default "\r\n"
        b"index,label,elbo,log_likelihood\n"
        b"0,7,-1.500000,-1.000000\n"
        b"1,0,-2.250000,-2.000000\n"
        b"2,3,-3.000000,-2.500000\n"
    )
    write_scores_csv(path, _scores())
    assert path.read_text().splitlines()[1:] == [
        "0,,-1.500000,-1.000000",
        "1,,-2.250000,-2.000000",
        "2,,-3.000000,-2.500000",
    ]
    with pytest.raises(ValueError):  # one label per point, or the rows would be misaligned
        write_scores_csv(path, _scores(), torch.tensor([7, 0]))


def test_the_standard_error_needs_two_points():
    s = _scores(2).summary()
    assert s["log_likelihood_se"] == pytest.approx(math.sqrt(0.5) / math.sqrt(2))  # sd / sqrt(N)
    assert math.isnan(_scores(1).summary()["log_likelihood_se"])


def _vae(likelihood="bernoulli"):
    torch.manual_seed(0)
    return build_vae((6,), likelihood=likelihood, latent_dim=2, hidden_dims=(8,))


def test_score_defaults_and_refusals(monkeypatch):
    """The documented defaults, seen in what a call does: 1000 samples in chunks of 100 for up to
    512 points per pass, a progress bar off, over N * K samples, advanced per pass."""
    bars = []

    @contextlib.contextmanager
    def recording_bar(enabled, total, what):
        bar = types.SimpleNamespace(done=0)
        bar.update = lambda n: setattr(bar, "done", bar.done + n)
        bars.append((enabled, total, what, bar))
        yield bar

    monkeypatch.setattr(scoring, "progress_bar", recording_bar)
    vae, x = _vae(), torch.bernoulli(torch.full((600, 6), 0.5))
    s = score(vae, x, eval_memory=None)
    assert s.num_samples == 1000
    assert (s.plan.particles, s.plan.points) == (100, 512)
    ((enabled, total, what, bar),) = bars
    assert (enabled, total, what, bar.done) == (False, 600 * 1000, "log p(x)", 600 * 1000)
    score(vae, x[:5], num_samples=3, progress=True, eval_memory=None)
    assert bars[-1][:3] == (True, 15, "log p(x)")
    vae, x = _vae(), torch.bernoulli(torch.full((4, 6), 0.5))
    for bad in ((0, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ConfigError) as info:
            score(vae, x, *bad, eval_memory=None)
        assert str(info.value) == (
            "`num_samples`, `chunk_size` and `batch_size` must be positive, got "
            f"{bad[0]}, {bad[1]}, {bad[2]}"
        )
    one = score(vae, x, num_samples=3, chunk_size=1, batch_size=1, eval_memory=None)
    assert one.num_samples == 3 and one.elbo.shape == (4,)


def test_mean_elbo_is_pyros_one_sample_elbo_on_the_same_draws():
    """One particle per point: the same z as Pyro's Trace_ELBO draws with the same seed, and the
    same Monte Carlo terms log p(x, z) - log q(z | x), so the mean ELBO is minus its loss over N,
    to float32 rounding."""
    vae, x = _vae(), torch.bernoulli(torch.full((5, 6), 0.5))
    vae.eval()
    pyro.set_rng_seed(3)
    got = mean_elbo(vae, x)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        loss = Trace_ELBO(max_plate_nesting=1).loss(vae.model, vae.guide, x)
    assert got == pytest.approx(-loss / 5, rel=1e-6, abs=1e-5)


def test_bits_per_dim_of_a_two_level_density():
    """num_levels = 2 is the smallest quantisation (a binary grid): log2(L - 1) = 0 added."""
    vae = _vae("normal")
    bpd = scoring.bits_per_dim(vae.likelihood, -6.0, 2)
    assert bpd == pytest.approx(6.0 / (6 * math.log(2)))
    assert scoring.bits_per_dim(vae.likelihood, -6.0, 1) is None


def test_one_byte_is_a_memory_size():
    assert scoring.parse_memory(1) == 1
    with pytest.raises(ConfigError, match="a memory size must be positive, got 0"):
        scoring.parse_memory(0)


class _Conjugate(torch.nn.Module):
    """z ~ N(0, 1), x | z ~ N(z, 1) with the observed site's extra arguments (0.25, b=0.5); the
    guide is the exact posterior N(x / 2, 1 / 2), so every importance weight is
    log N(x; 0, 2) - 0.75."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", _Shifted(z, 1.0), 0.25, b=0.5, obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))


def test_scoring_passes_an_observed_sites_extra_arguments_to_log_prob():
    """log p(x) is exact (every weight equal). The reconstruction term is
    E_q[log N(x; z, 1)] - 0.75 = -log(2 pi) / 2 - ((x / 2)^2 + 1 / 2) / 2 - 0.75 in closed form,
    estimated from 4000 draws per point (sd of a draw below 0.8, standard error below 0.013):
    tolerance 0.08, 6 standard errors; dropping either argument moves it by 0.25 or 0.5."""
    x = torch.linspace(-2.0, 2.0, 7)
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = score(_Conjugate(), x, num_samples=5, chunk_size=5, eval_memory=None)
        terms = scoring.per_point_terms(_Conjugate(), x, num_samples=4000)
    log_px = -0.25 * x**2 - 0.5 * math.log(2 * math.pi * 2) - 0.75
    torch.testing.assert_close(s.log_likelihood, log_px, rtol=0, atol=1e-5)
    recon = -0.5 * math.log(2 * math.pi) - 0.5 * ((x / 2) ** 2 + 0.5) - 0.75
    torch.testing.assert_close(terms.recon, recon, rtol=0, atol=0.08)


# ------------------------------------------------- chunk planning under a known memory model


def _linear_memory(monkeypatch, a: int, s: int, calls: list):
    """``pass_memory`` replaced by M(k, n) = n / n0 (a + s (k - 1)) bytes, exactly (so the
    chord of plan_chunks is exact too): the plan can be checked against a brute-force search."""

    def fake(module, x, k):
        calls.append((x.shape[0], k))
        return math.ceil(
            x.shape[0] / min(scoring.PROBE_POINTS, x.shape[0]) * (a + s * (k - 1))
        ), "m"

    monkeypatch.setattr(scoring, "pass_memory", fake)


def _memory(a, s, k, n, n0):
    return math.ceil((a + s * (k - 1)) * n / n0)


@pytest.mark.parametrize("a, s", [(1000, 300), (1, 1), (4096, 0)])
def test_the_plan_is_the_largest_chunk_within_the_budget(monkeypatch, a, s):
    """Shrinking particles before points: (c, B) if it fits; else the largest k <= k2 with
    M(k, B) <= budget; else one particle and the largest n. The budgets are every k's boundary
    exactly, one byte below each, and two that fit fewer points than the batch."""
    x = torch.zeros(40, 3)
    n0, c, big_b = scoring.PROBE_POINTS, 25, 40
    exact = {_memory(a, s, k, big_b, n0) for k in range(1, c + 1)}  # each k's own boundary
    below = {b - 1 for b in exact if b > 1}
    tiny = {max(a // 2, 1), max(a // 10, 1)}  # fewer points than the batch, or one
    for budget in sorted(exact | below | tiny):
        calls = []
        _linear_memory(monkeypatch, a, s, calls)
        plan = scoring.plan_chunks(None, x, num_samples=100, chunk_size=c, eval_memory=budget)
        k2 = max(1, min(c, budget // max(a, 1)))
        assert calls == [(n0, 1)] + ([(n0, k2)] if k2 > 1 else [])
        fits = [k for k in range(1, k2 + 1) if _memory(a, s, k, big_b, n0) <= budget]
        if k2 == c and c in fits:
            want = (c, big_b)
        elif fits:
            want = (max(fits), big_b)
        else:
            points = [n for n in range(1, big_b + 1) if _memory(a, s, 1, n, n0) <= budget]
            want = (1, max(points, default=1))
        assert (plan.particles, plan.points) == want, budget
        assert plan.budget == budget and plan.measured_by == "m"
        assert plan.estimate == _memory(a, s, plan.particles, plan.points, n0)


def test_the_plans_fixed_chunk_and_its_edges(monkeypatch):
    x = torch.zeros(600, 3)
    assert scoring.plan_chunks(None, x, 1000, eval_memory=None) == scoring.ChunkPlan(100, 512)
    assert scoring.plan_chunks(None, x, 1000, 1, 1, eval_memory=None) == scoring.ChunkPlan(1, 1)
    calls = []
    _linear_memory(monkeypatch, 100, 10, calls)
    one = scoring.plan_chunks(None, x[:1], 5, eval_memory=10**6)  # one point is still probed
    assert one.budget == 10**6 and calls == [(1, 1), (1, 5)]
    assert scoring.plan_chunks(None, x[:0], 5, eval_memory=10**6) == scoring.ChunkPlan(5, 1)


# ------------------------------------------------------------------------ measuring memory
def test_tensor_memory_starts_at_zero_and_counts_a_one_byte_storage():
    with torch.no_grad(), scoring.TensorMemory() as mem:
        pass
    assert (mem.current, mem.peak) == (0, 0)
    with torch.no_grad(), scoring.TensorMemory() as mem:
        b = torch.ones(1, dtype=torch.uint8)  # one byte
        assert mem.current == 1
        del b
    assert (mem.current, mem.peak) == (0, 1)


def test_tensor_memory_does_not_count_a_view_of_an_input_passed_by_keyword():
    x = torch.ones(10_000)
    with torch.no_grad(), scoring.TensorMemory() as mem:
        v = torch.reshape(input=x, shape=(100, 100))  # a view of x, reached through kwargs
        w = torch.add(input=torch.ones(10), other=x[:10])  # 40 bytes, x's slice not counted
    assert v.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert mem.peak == 80 and w.shape == (10,)  # the ones(10) and the sum, 40 bytes each


def test_peak_memory_on_a_cpu_is_the_factor_times_the_count_rounded_up():
    assert scoring.CPU_MEMORY_FACTOR == 1.5

    def three_bytes():
        return torch.zeros(3, dtype=torch.uint8)

    peak, how = scoring.peak_memory(three_bytes, torch.device("cpu"))
    assert peak == 5  # ceil(3 x 1.5)
    assert how == "1.5 x the peak bytes of the tensors a pass creates"


def test_peak_memory_on_a_gpu_reads_the_allocator_around_the_call(monkeypatch):
    """The CUDA branch, run against a fake allocator (no GPU here): the peak counter is reset
    on the device asked for, the device synchronised before the base reading and after the
    call, and the result is the peak above the base."""
    device = torch.device("cuda", 1)
    calls: list[tuple[str, object]] = []
    mem = {"allocated": 1000, "peak": 5000, "pending": 0}

    def on(name, result=None):
        def f(dev):
            calls.append((name, dev))
            if name == "synchronize":  # the queued work lands
                mem["allocated"] += mem["pending"]
                mem["peak"] = max(mem["peak"], mem["allocated"])
                mem["pending"] = 0
            if name == "reset_peak_memory_stats":
                mem["peak"] = mem["allocated"]
            return mem[result] if result else None

        return f

    monkeypatch.setattr(torch.cuda, "synchronize", on("synchronize"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", on("reset_peak_memory_stats"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", on("memory_allocated", "allocated"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", on("max_memory_allocated", "peak"))
    mem["pending"] = 200  # earlier work still queued: part of the base, not of the pass

    def work():
        calls.append(("fn", None))
        mem["pending"] = 700  # asynchronous: seen only after a synchronize

    peak, how = scoring.peak_memory(work, device)
    assert (peak, how) == (700, "torch.cuda.max_memory_allocated")
    assert calls == [
        ("synchronize", device), ("reset_peak_memory_stats", device),
        ("memory_allocated", device), ("fn", None), ("synchronize", device),
        ("max_memory_allocated", device),
    ]  # fmt: skip
