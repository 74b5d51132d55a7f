r"""Comparing ELBO estimators on one model, one data split, one set of seeds.

:func:`compare_estimators` trains the same VAE once per (estimator, seed) and measures, for each:

- the training curve (per-epoch validation ELBO and wall time) and seconds per epoch, with
  which implementation computed the training steps (``fast_path``): ``fit`` trains ``trace``
  and ``meanfield`` on the fused fast path (:mod:`ppl_vae.inference.fastpath`: Pyro's loss and
  gradients without Pyro's tracing) and every other estimator with Pyro's ELBO, so seconds per
  epoch compare implementations as well as estimators (``tracegraph`` equals ``trace`` bit for
  bit on a reparameterised model and is slower only for running on Pyro);
- the test ELBO and the importance-sampled test log-likelihood (K from the config,
  ``log_likelihood_samples``, 1000 by default);
- the **gradient variance and signal-to-noise ratio** (Rainforth et al. 2018) of the encoder's
  and of the decoder's parameters, at fixed epochs, from ``grad_repeats`` evaluations of the
  estimator's own ``differentiable_loss`` on one fixed batch (:func:`gradient_statistics`):

  .. math:: \mathrm{SNR}_j = \frac{|\mathbb{E}[g_j]|}{\sqrt{\operatorname{Var}[g_j]}},
            \qquad \overline{\mathrm{SNR}} = \frac1P \sum_{j=1}^P \mathrm{SNR}_j

  averaged over the P parameters of a network (parameters whose gradient never varies are left
  out). The probe runs inside ``fit``'s ``on_epoch_end`` hook with every random number
  generator saved and restored (and module buffers restored), so measuring does not change the
  training trajectory; its time is not counted in the epoch's seconds;
- the Pareto-smoothed importance-sampling shape :math:`\hat k` (Yao et al. 2018; arviz's
  ``psislw``) of each of ``khat_points`` test points' importance weights
  :math:`\log w_s = \log p(x, z_s) - \log q(z_s \mid x)`, ``khat_samples`` draws each:
  :math:`\hat k < 0.5` good, :math:`0.5 \le \hat k < 0.7` usable, :math:`\hat k \ge 0.7` means
  q is a poor proposal for that point;
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over training; on CPU the peak
  resident set size of the process (``ru_maxrss``), which is only meaningful per run when
  every run has a process of its own (``isolate=True``, the default: each run is a fresh
  ``spawn``-ed process). The columns say which was measured; nothing is reported that was not.

Every run of a seed starts from the same weights: ``fit`` seeds all generators with the run's
seed before it builds the model, the model is built before the estimator, and
:func:`~ppl_vae.inference.estimators.make_elbo` draws no random numbers. ``init_digest`` (a hash of the
initial weights) is in ``compare.csv`` so this can be checked. The data split is fixed by
``data_seed`` (the config's ``seed``) for all runs; the gradient batch is fixed for all runs.
When the likelihood needs binary data and the data are not binary, ``fit`` binarises the test
set from the run's seed, so runs of one seed score the same test set and seeds differ in it.

Files written to ``out``: ``compare.csv`` (one row per estimator and seed), ``compare.md``
(mean ± sd over seeds per estimator), ``curves.csv`` (per-epoch curves), ``khat.csv``
(per-point :math:`\hat k`), ``figures/elbo_vs_time.png``, ``figures/snr_vs_k.png`` (when the run
holds ``iwae:K`` or ``dreg:K`` estimators), ``figures/khat.png`` (``az.plot_khat`` per
estimator), and per run ``runs/<estimator>-seed<seed>/`` (``fit``'s run directory) with
``posterior.nc``: draws of :math:`z \sim q(z \mid x)` for ``posterior_points`` test points and
their log importance weights, as arviz ``InferenceData``.

**M2** (``kind="m2"``, :mod:`.compare_m2`): each row is an (estimator, label guide) pair trained
by :func:`~ppl_vae.ssl.fit_ssl` on one seed's data split and labelled subset, from the same
initial weights; the columns add ``test_accuracy`` (and the validation accuracies) to the test
ELBO and log p(x) of M2's own evaluation (y summed out exactly), the gradient groups add the
``classifier``, and the curve figure is ``figures/accuracy_vs_time.png``.

References:
    Rainforth, Kosiorek, Le, Maddison, Igl, Wood, Teh (2018), Tighter variational bounds are
    not necessarily better.
    Yao, Vehtari, Simpson, Gelman (2018), Yes, but did it work?: Evaluating variational
    inference.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import multiprocessing
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from ..config import ConfigFile, FitConfig, SSLConfig, write_text_atomic
from ..data import Dataset
from ..inference.estimators import make_elbo, parse_estimator
from ..inference.scoring import log_weights, mean_elbo
from ..kinds.m2 import LOG_LIKELIHOOD_SAMPLES as M2_LOG_LIKELIHOOD_SAMPLES
from ..kinds.m2 import TRAIN_LOG_LIKELIHOOD_SAMPLES as M2_TRAIN_LOG_LIKELIHOOD_SAMPLES
from ..models.errors import ConfigError
from ..train import (
    TrainingError,
    build_config_model,
    build_config_vae,
    config_as_dict,
    fit,
    load_config_data,
    prepare_data,
    resolve_device,
)
from ..training.callbacks import Callback
from ..training.optim import make_adam
from ..training.trainer import Trainer
from ..vae import VAE

__all__ = [
    "DEFAULT_ESTIMATORS",
    "CompareResult",
    "GradientStats",
    "RunJob",
    "RunRecord",
    "canonical_estimator",
    "compare_estimators",
    "gradient_statistics",
    "initial_weights_digest",
    "maxrss_mb",
    "posterior_draws",
    "preserved_rng",
    "weights_digest",
]

#: k-hat above which importance sampling (and q as a proposal) is unreliable (Vehtari et al.).
KHAT_THRESHOLD = 0.7
OUTPUT_FILES = ("compare.csv", "compare.md", "curves.csv", "khat.csv")
OUTPUT_DIRS = ("figures", "runs")
_GROUPS = ("encoder", "decoder")
#: The estimators of a VAE comparison when none are given.
DEFAULT_ESTIMATORS = ("trace", "meanfield", "tracegraph", "iwae:5", "dreg:5", "stl")


# --------------------------------------------------------------------------------------------
# Gradient statistics
# --------------------------------------------------------------------------------------------
@dataclass
class GradientStats:
    r"""Per-parameter gradient mean, variance and SNR of one group of parameters.

    Attributes:
        mean: :math:`\hat{\mathbb E}[g_j]`, shape ``(P,)`` (float64, CPU).
        variance: unbiased :math:`\widehat{\operatorname{Var}}[g_j]`, shape ``(P,)``.
        repeats: the number of gradient evaluations R.
    """

    mean: torch.Tensor
    variance: torch.Tensor
    repeats: int

    @property
    def snr(self) -> torch.Tensor:
        r""":math:`|\hat{\mathbb E}[g_j]| / \hat\sigma_j` per parameter (``nan`` where
        :math:`\hat\sigma_j = 0`)."""
        std = self.variance.clamp_min(0).sqrt()
        return torch.where(std > 0, self.mean.abs() / std, torch.full_like(std, math.nan))

    def summary(self) -> dict[str, float]:
        r"""``snr``: mean of :math:`\mathrm{SNR}_j` over parameters whose gradient varies;
        ``variance``: mean of :math:`\operatorname{Var}[g_j]` over all parameters
        (:math:`\operatorname{tr}\Sigma / P`); ``num_parameters``; ``num_constant`` (gradient
        identical in every repeat, left out of ``snr``)."""
        snr = self.snr
        varying = ~torch.isnan(snr)
        return {
            "snr": float(snr[varying].mean()) if bool(varying.any()) else math.nan,
            "variance": float(self.variance.mean()) if self.variance.numel() else math.nan,
            "num_parameters": float(self.variance.numel()),
            "num_constant": float((~varying).sum()),
        }


def gradient_statistics(
    loss_fn: Callable[[], torch.Tensor],
    groups: Mapping[str, Sequence[torch.Tensor]],
    repeats: int,
) -> dict[str, GradientStats]:
    r"""Mean and variance of each parameter's gradient over ``repeats`` independent evaluations.

    .. math:: \hat\mu_j = \frac1R \sum_r g_j^{(r)}, \qquad
              \hat\sigma_j^2 = \frac1{R-1} \sum_r \bigl(g_j^{(r)} - \hat\mu_j\bigr)^2

    Each evaluation calls ``loss_fn()`` and differentiates it with ``torch.autograd.grad``, so
    the parameters' ``.grad`` are left untouched. Moments are accumulated in float64 with
    Welford's update, so memory is O(P) whatever R.

    Args:
        loss_fn: returns a fresh stochastic scalar loss each call.
        groups: named lists of parameters, e.g. ``{"encoder": [...], "decoder": [...]}``.
        repeats: R >= 2.

    Returns:
        ``{group: GradientStats}``.

    Example:
        >>> theta = torch.zeros(3, requires_grad=True)
        >>> stats = gradient_statistics(lambda: (theta * (1 + torch.randn(3))).sum(),
        ...                             {"theta": [theta]}, repeats=400)
        >>> 0.8 < stats["theta"].summary()["snr"] < 1.25
        True
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 2:
        raise ConfigError(f"`grad_repeats` must be an integer >= 2, got {repeats!r}")
    names = list(groups)
    params = [p for name in names for p in groups[name]]
    if not params:
        raise ConfigError("gradient_statistics needs at least one parameter, got none")
    sizes = [sum(p.numel() for p in groups[name]) for name in names]
    total = sum(sizes)
    mean = torch.zeros(total, dtype=torch.float64)
    m2 = torch.zeros(total, dtype=torch.float64)
    for r in range(1, repeats + 1):
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).detach().reshape(-1)
                for g, p in zip(grads, params)
            ]
        ).to("cpu", torch.float64)
        delta = flat - mean
        mean += delta / r
        m2 += delta * (flat - mean)
    variance = m2 / (repeats - 1)
    out: dict[str, GradientStats] = {}
    start = 0
    for name, size in zip(names, sizes):
        out[name] = GradientStats(
            mean[start : start + size].clone(), variance[start : start + size].clone(), repeats
        )
        start += size
    return out


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Save the torch (CPU and CUDA), Python and NumPy generator states; restore them on exit."""
    state = pyro.util.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def network_groups(module: torch.nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """The probe's two parameter groups: the inference side and the generative side.

    A module with ``encoder`` and ``decoder`` (the built-in VAE) gives theirs. For any other
    model/guide pair (``--model``) the ``"encoder"`` group is every parameter the guide's
    log-density of its own draws depends on (on the batch ``x``), the ``"decoder"`` group the
    remaining ones (the model's).
    """
    encoder, decoder = getattr(module, "encoder", None), getattr(module, "decoder", None)
    if isinstance(encoder, torch.nn.Module) and isinstance(decoder, torch.nn.Module):
        return {
            "encoder": [p for p in encoder.parameters() if p.requires_grad],
            "decoder": [p for p in decoder.parameters() if p.requires_grad],
        }
    params = [p for p in module.parameters() if p.requires_grad]
    with preserved_rng():
        guide_tr = poutine.trace(module.guide).get_trace(x)
    log_q = sum(
        s["fn"].log_prob(s["value"]).sum()
        for s in guide_tr.nodes.values()
        if s["type"] == "sample" and not s["is_observed"]
    )
    grads = torch.autograd.grad(log_q, params, allow_unused=True) if params else []
    used = {id(p) for p, g in zip(params, grads) if g is not None}
    return {
        "encoder": [p for p in params if id(p) in used],
        "decoder": [p for p in params if id(p) not in used],
    }


class _GradientProbe:
    """``on_epoch_end`` hook: gradient statistics of the estimator at chosen epochs.

    Runs with all generators saved and restored, module buffers restored, ``.grad`` untouched,
    so the training trajectory is the one an unmeasured run follows.
    """

    def __init__(
        self,
        elbo: Any,
        batch: torch.Tensor,
        points: Sequence[int],
        repeats: int,
        seed: int,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.elbo = elbo
        self.batch = batch
        self.points = set(points)
        self.repeats = repeats
        self.seed = seed
        self.on_call = on_call
        self.results: dict[int, dict[str, float]] = {}

    def __call__(self, epoch: int, vae: VAE, history: list[dict[str, float]]) -> None:
        if self.on_call is not None:
            self.on_call()
        if epoch not in self.points:
            return
        t0 = time.perf_counter()
        x = self.batch.to(next(vae.parameters()).device)
        buffers = {name: b.detach().clone() for name, b in vae.named_buffers()}
        old_scale = getattr(vae, "kl_scale", None)
        if old_scale is not None:
            vae.kl_scale = 1.0
        try:
            with preserved_rng():
                pyro.set_rng_seed(self.seed * 100_003 + epoch)
                stats = gradient_statistics(
                    lambda: self.elbo.differentiable_loss(vae.model, vae.guide, x),
                    network_groups(vae, x),
                    self.repeats,
                )
        finally:
            if old_scale is not None:
                vae.kl_scale = old_scale
            with torch.no_grad():
                for name, b in vae.named_buffers():
                    b.copy_(buffers[name])
        row: dict[str, float] = {}
        for group, s in stats.items():
            summary = s.summary()
            row[f"snr_{group}"] = summary["snr"]
            row[f"grad_var_{group}"] = summary["variance"]
        row["grad_probe_seconds"] = time.perf_counter() - t0
        self.results[epoch] = row


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------
def initial_weights_digest(vae: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters and buffers, in state-dict order."""
    return weights_digest(vae.state_dict())


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (first 16 hex digits) of named tensors (names and bytes), in the mapping's order."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _build_like_fit(cfg: FitConfig, dataset: Dataset) -> VAE:
    """The model ``fit`` builds for ``cfg`` and ``dataset``, built the way ``fit`` builds it.

    ``fit`` seeds every generator with ``cfg.seed`` and, given a dataset, builds the model next;
    a test checks that this reproduces ``fit``'s initial weights.
    """
    pyro.set_rng_seed(cfg.seed)
    if cfg.kind == "user":
        return build_config_model(cfg, dataset)
    return build_config_vae(cfg, dataset)


def _load_dataset(cfg: FitConfig, data_seed: int) -> Dataset:
    return load_config_data(cfg, seed=data_seed)


def _fixed_batch(train_x: torch.Tensor, size: int, dynamic: bool, data_seed: int) -> torch.Tensor:
    """The gradient probe's batch: the same points (and binarisation) for every run."""
    g = torch.Generator().manual_seed(data_seed)
    x = train_x.cpu()
    idx = torch.randperm(x.shape[0], generator=g)[: min(size, x.shape[0])]
    xb = x[idx]
    if dynamic:
        xb = torch.bernoulli(xb, generator=g)
    return xb


@torch.no_grad()
def _importance_log_weights(vae: VAE, x: torch.Tensor, samples: int, chunk: int) -> torch.Tensor:
    """``(samples, N)`` log importance weights (scoring.log_weights, drawn in chunks)."""
    parts = []
    done = 0
    while done < samples:
        k = min(chunk, samples - done)
        parts.append(log_weights(vae.model, vae.guide, x, k))
        done += k
    return torch.cat(parts, 0)


@torch.no_grad()
def posterior_draws(
    vae: VAE, x: torch.Tensor, draws: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    r"""``draws`` samples of every latent site :math:`z_s \sim q(z \mid x)`, each
    ``(draws, N, D_s)``, and their log weights :math:`\log p(x, z) - \log q(z \mid x)`
    ``(draws, N)`` (unscaled)."""
    with pyro.plate("_posterior_draws", draws, dim=-2):
        guide_tr = poutine.trace(vae.guide).get_trace(x)
        model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    shape = (draws, x.shape[0])
    lw = x.new_zeros(shape)
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for site in tr.nodes.values():
            if site["type"] == "sample" and not site["name"].startswith("_posterior"):
                lw = lw + sign * site["fn"].log_prob(site["value"]).expand(shape)
    z = {
        name: site["value"].reshape(draws, x.shape[0], -1)
        for name, site in prune_subsample_sites(guide_tr).nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    return z, lw


def _warm_up(cfg: FitConfig, dataset: Dataset, x: torch.Tensor) -> None:
    """One optimiser step, one evaluation and one checkpoint-like save on a throwaway model.

    Loads the libraries and kernels training uses lazily, so the peak RSS read afterwards (the
    baseline) holds them and the increase over it is what training itself adds.
    """
    with pyro.settings.context(module_local_params=True), preserved_rng():
        vae = _build_like_fit(cfg, dataset)
        elbo = make_elbo(cfg.estimator, cfg.num_particles, cfg.vectorize_particles)
        optimizer = make_adam(vae.parameters(), lr=cfg.lr)
        elbo.differentiable_loss(vae.model, vae.guide, x).backward()
        optimizer.step()
        mean_elbo(vae, x)
        torch.save({"model": vae.state_dict(), "optimizer": optimizer.state_dict()}, io.BytesIO())


def maxrss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


@dataclass
class RunJob:
    """What one run (a process of its own when isolated) needs: its config and measurements.

    ``kind`` is ``"vae"`` (the VAE or a user's pair, trained by ``fit``) or ``"m2"`` (trained by
    ``fit_ssl``, :mod:`.compare_m2`); an M2 run has its ``row`` (resolved estimator, label guide,
    particles) and the ``reference`` initial values of the weights every row shares.
    """

    config: dict[str, Any]
    data_seed: int
    dataset: Dataset | None
    run_dir: str | None
    grad_points: tuple[int, ...]
    grad_repeats: int
    grad_batch_size: int
    khat_points: int
    khat_samples: int
    posterior_index: tuple[int, ...]
    posterior_draws: int
    quiet: bool
    fit_figures: bool
    isolated: bool
    num_threads: int | None = None
    kind: str = "vae"
    row: tuple[str, str, int] | None = None
    reference: dict[str, torch.Tensor] | None = None


@dataclass
class RunRecord:
    """Everything measured in one (estimator, seed) run; M2 runs also have a ``label_guide``."""

    estimator: str
    seed: int
    num_particles: int
    status: str  # "ok", or "diverged: <message>"
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    gradients: dict[int, dict[str, float]] = field(default_factory=dict)
    khat_log_weights: np.ndarray | None = None  # (khat_points, khat_samples)
    posterior_z: dict[str, np.ndarray] | None = None  # latent site -> (draws, points, D_s)
    posterior_log_weights: np.ndarray | None = None  # (draws, points)
    posterior_x: np.ndarray | None = None  # (points, *data_shape)
    posterior_index: tuple[int, ...] = ()
    init_digest: str = ""
    memory: dict[str, float] = field(default_factory=dict)
    run_dir: str | None = None
    khat: np.ndarray | None = None  # (khat_points,), filled in by the parent
    label_guide: str | None = None  # M2: the row's label guide
    init_from_reference: bool | None = None  # M2: shared weights set to the first row's
    #: Training steps computed by the fused fast path and by Pyro's ELBO (None: not counted).
    fast_path_steps: int | None = None
    pyro_steps: int | None = None
    fast_path_partly: bool = False  # some terms of the loss ran Pyro's ELBO at every step

    @property
    def label(self) -> str:
        """The row's name in tables and figures: ``estimator`` (M2: ``estimator @ guide``)."""
        if self.label_guide is None:
            return self.estimator
        return f"{self.estimator} @ {self.label_guide}"


class StepPathCounter(Callback):
    """After training: how many loss evaluations the kind computed on its fused fast path and
    on Pyro (:attr:`~ppl_vae.kinds.base.ModelKind.step_paths`); a kind with one implementation
    counts no fast steps. The VAE counts steps (``trace`` and ``meanfield`` have the fast path),
    M2 its term evaluations (labelled, unlabelled, classification)."""

    def __init__(self) -> None:
        self.fast: int | None = None
        self.pyro: int | None = None
        self.partly = False  # some terms of the loss ran Pyro's ELBO at every step

    def on_train_end(self, trainer: Trainer) -> None:
        steps = trainer.kind.step_paths
        if steps is not None:
            self.fast, self.pyro = int(steps["fast"]), int(steps["pyro"])
            self.partly = bool(steps.get("pyro_terms", 0)) and self.fast > 0
        else:
            self.fast, self.pyro = 0, None


def _run_one(job: RunJob) -> RunRecord:
    """Train and measure one (estimator, seed). Runs in a fresh process when ``isolated``."""
    if job.kind == "m2":
        from .compare_m2 import run_m2

        return run_m2(job)
    if job.num_threads is not None:
        torch.set_num_threads(job.num_threads)
    cfg = FitConfig.from_dict(job.config)
    with pyro.settings.context(module_local_params=True), preserved_rng():
        dataset = job.dataset if job.dataset is not None else _load_dataset(cfg, job.data_seed)
        reference = _build_like_fit(cfg, dataset)
        digest = initial_weights_digest(reference)
        _, _, _, dynamic = prepare_data(dataset, reference, cfg.binarize, cfg.seed)
        batch = _fixed_batch(dataset.train_x, job.grad_batch_size, dynamic, job.data_seed)
        del reference
    elbo = make_elbo(cfg.estimator, cfg.num_particles, cfg.vectorize_particles, max_plate_nesting=1)
    record = RunRecord(cfg.estimator, cfg.seed, int(elbo.num_particles), "ok", init_digest=digest)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    memory: dict[str, float] = {}
    if job.isolated:
        _warm_up(cfg, dataset, batch[:2])
        memory["rss_baseline_mb"] = maxrss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def read_memory() -> None:
        # Called at the start of every on_epoch_end, before the gradient probe: the last reading
        # covers training, per-epoch validation and the probes of earlier epochs (one batch).
        if job.isolated:
            memory["rss_peak_train_mb"] = maxrss_mb()
        if cuda:
            memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    probe = _GradientProbe(
        elbo, batch, job.grad_points, job.grad_repeats, cfg.seed, on_call=read_memory
    )
    counter = StepPathCounter()
    try:
        result = fit(
            cfg,
            out=job.run_dir,
            quiet=job.quiet,
            dataset=dataset,
            figures=job.fit_figures,
            on_epoch_end=probe,
            callbacks=[counter],
        )
    except TrainingError as e:
        record.status = f"diverged: {e}"
        return record
    record.fast_path_steps, record.pyro_steps = counter.fast, counter.pyro
    record.fast_path_partly = counter.partly
    record.history = [dict(h) for h in result.history]
    record.metrics = {
        k: v for k, v in result.metrics.items() if isinstance(v, int | float | str | bool)
    }
    record.gradients = probe.results
    record.memory = memory
    record.run_dir = job.run_dir

    vae = result.vae
    was_training = vae.training
    vae.eval()
    if hasattr(vae, "kl_scale"):
        vae.kl_scale = 1.0
    with pyro.settings.context(module_local_params=True), preserved_rng():
        pyro.set_rng_seed(cfg.seed + 7919)
        _, _, test_x, _ = prepare_data(result.dataset, vae, cfg.binarize, cfg.seed)
        if job.khat_points > 0:
            xs = test_x[: job.khat_points]
            lw = _importance_log_weights(vae, xs, job.khat_samples, cfg.log_likelihood_chunk)
            record.khat_log_weights = lw.T.double().cpu().numpy()
        if job.posterior_index and job.posterior_draws > 0:
            idx = [i for i in job.posterior_index if i < test_x.shape[0]]
            xp = test_x[idx]
            z, plw = posterior_draws(vae, xp, job.posterior_draws)
            record.posterior_z = {k: v.double().cpu().numpy() for k, v in z.items()}
            record.posterior_log_weights = plw.double().cpu().numpy()
            record.posterior_x = xp.cpu().numpy()
            record.posterior_index = tuple(idx)
    vae.train(was_training)
    return record


def _child(conn: Any, job: RunJob) -> None:
    """Entry point of an isolated run's process: send back ``("ok", record)`` or the error."""
    try:
        conn.send(("ok", _run_one(job)))
    except BaseException as e:  # every failure, KeyboardInterrupt included, goes back
        try:
            conn.send(("error", e))
        except Exception:  # an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


def _run_isolated(job: RunJob) -> RunRecord:
    """Run ``job`` in a fresh ``spawn``-ed process (a clean peak-RSS counter per run)."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(sender, job), daemon=True)
    process.start()
    sender.close()
    try:
        kind, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"the process of run {job.config['estimator']!r} seed {job.config['seed']} ended "
            f"without a result (exit code {process.exitcode}). Runs are started with the "
            "'spawn' method, which re-imports the main script: a script that calls "
            "compare_estimators at import time must do so under `if __name__ == '__main__':`. "
            "Or pass isolate=False (then CPU memory is not measured)."
        ) from None
    finally:
        receiver.close()
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
            process.join()
    if kind == "error":
        raise payload
    return payload


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------
def canonical_estimator(spec: str) -> str:
    name, arg = parse_estimator(spec)
    return name if arg is None else f"{name}:{arg:g}"


def _run_name(spec: str, seed: int) -> str:
    return f"{spec.replace(':', '-')}-seed{seed}"


def _as_spec_list(estimators: Sequence[str] | str) -> list[str]:
    if isinstance(estimators, str):
        estimators = [s for s in estimators.split(",") if s.strip()]
    if not isinstance(estimators, Sequence) or not estimators:
        raise ConfigError(
            f"`estimators` must be a non-empty list like ['trace', 'iwae:5'], got {estimators!r}"
        )
    specs = [canonical_estimator(s) for s in estimators]
    dup = sorted({s for s in specs if specs.count(s) > 1})
    if dup:
        raise ConfigError(f"`estimators` lists {dup} more than once")
    return specs


def _as_seed_list(seeds: Sequence[int]) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, Sequence)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
    ):
        raise ConfigError(f"`seeds` must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"`seeds` has repeated values: {list(seeds)}")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"`seeds` must be non-negative, got {list(seeds)}")
    return list(seeds)


def default_grad_points(epochs: int) -> tuple[int, ...]:
    """First, middle and last epoch."""
    return tuple(sorted({1, max(1, (epochs + 1) // 2), epochs}))


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def _preflight(cfg: FitConfig, dataset: Dataset, specs: list[str]) -> None:
    """Evaluate every estimator's loss once on two training points: fail before any training."""
    with pyro.settings.context(module_local_params=True), preserved_rng():
        vae = _build_like_fit(cfg, dataset)
        train_x, _, _, dynamic = prepare_data(dataset, vae, cfg.binarize, cfg.seed)
        x = train_x[:2]
        if dynamic:
            x = torch.bernoulli(x)
        for spec in specs:
            elbo = make_elbo(spec, cfg.num_particles, cfg.vectorize_particles, max_plate_nesting=1)
            try:
                loss = elbo.differentiable_loss(vae.model, vae.guide, x)
            except ConfigError as e:
                raise ConfigError(f"estimator {spec!r} cannot train this model: {e}") from None
            except (ValueError, NotImplementedError, RuntimeError) as e:
                raise ConfigError(
                    f"estimator {spec!r} cannot train this model: {type(e).__name__}: {e}"
                ) from None
            if not torch.is_tensor(loss) or not loss.requires_grad:
                raise ConfigError(f"estimator {spec!r} gives a loss without a gradient here")


@dataclass
class CompareResult:
    """What :func:`compare_estimators` returns.

    Attributes:
        rows: one dict per (estimator, seed): the columns of ``compare.csv``.
        summary: one dict per estimator: ``n`` (seeds that finished) and, per numeric column,
            ``<column>`` (mean over seeds) and ``<column>_sd`` (sample sd; nan with one seed).
        runs: the full :class:`RunRecord` of every run.
        meta: the settings (epochs, K, grad points, memory measure, ...).
        out: the output directory, or None.
        files: the files written.
    """

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    runs: list[RunRecord]
    meta: dict[str, Any]
    out: Path | None = None
    files: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        """The Markdown table (mean ± sd over seeds) with notes, as in ``compare.md``."""
        return _markdown(self)


def _config_class(kind: str | None, config: Any) -> type[FitConfig] | type[SSLConfig]:
    """The config class of ``kind`` if given (checked against ``config``), else of the kind
    ``config`` records (an :class:`SSLConfig`, or a dict with ``kind``), else :class:`FitConfig`."""
    recorded: str | None = None
    if isinstance(config, SSLConfig):
        recorded = "m2"
    elif isinstance(config, FitConfig):
        recorded = config.kind
    elif isinstance(config, dict) and config.get("kind") is not None:
        recorded = config["kind"]
    for name, value in (("`kind`", kind), ("the config's kind", recorded)):
        if value is not None and value not in ConfigFile.by_kind:
            raise ConfigError(f"{name} must be one of {sorted(ConfigFile.by_kind)}, got {value!r}")
    if kind is not None and recorded is not None:
        if ConfigFile.by_kind[recorded] is not ConfigFile.by_kind[kind]:
            raise ConfigError(
                f"kind {kind!r} asked for, but the config is of model kind {recorded!r}"
            )
    chosen = kind or recorded
    return SSLConfig if chosen == "m2" else FitConfig


def compare_estimators(
    estimators: Sequence[str] | str | None,
    seeds: Sequence[int] | None,
    config: FitConfig | SSLConfig | dict[str, Any] | None = None,
    out: str | Path | None = None,
    *,
    kind: str | None = None,
    label_guides: Sequence[str] | str | None = None,
    grad_points: Sequence[int] | None = None,
    grad_repeats: int = 100,
    grad_batch_size: int | None = None,
    khat_points: int = 100,
    khat_samples: int | None = None,
    posterior_points: int | Sequence[int] = 5,
    posterior_draws: int = 500,
    isolate: bool = True,
    overwrite: bool = False,
    fit_figures: bool = False,
    dataset: Dataset | None = None,
    quiet: bool = True,
    **options: Any,
) -> CompareResult:
    r"""Train the same model with each estimator (M2: each estimator and label guide) and seed;
    measure and tabulate.

    Every run uses the same model, data split, fixed gradient batch and, for a given seed, the
    same initial weights; see the module docstring for what is measured, and
    :mod:`~ppl_vae.runs.compare_m2` for the M2 kind.

    Args:
        estimators: specs such as ``["trace", "meanfield", "tracegraph", "iwae:5", "dreg:5",
            "stl", "renyi:0.5"]`` (or one comma-separated string). All are validated, and each
            loss evaluated once on the model, before any training. M2: also ``"auto"`` (each
            label guide's own estimator, the default) and pairs ``"ESTIMATOR@GUIDE"``.
        seeds: training seeds (initial weights, batches, noise), e.g. ``[0, 1, 2]``; None is the
            config's ``seed``. M2: each is a whole ``ppl-vae ssl --seed`` (data split, labelled
            subset, initial weights), so each run directory reproduces with ``ppl-vae ssl
            --config``; rows of one seed share all three.
        config: a :class:`FitConfig`, an :class:`SSLConfig` (M2) or dict; for the VAE its
            ``seed`` fixes the data split (``data_seed``); its ``estimator`` is ignored; keyword
            ``options`` override fields (``epochs=20``).
        out: output directory (see the module docstring); None keeps everything in memory.
        kind: ``"vae"``, ``"user"`` or ``"m2"``; default the config's (``"vae"`` without one).
        label_guides: M2: the label guides each estimator (not given as a pair) is paired with;
            default the config's ``label_guide``.
        grad_points: epochs (1-based) after which gradients are probed; default first, middle
            and last epoch.
        grad_repeats: gradient evaluations per probe (R).
        grad_batch_size: size of the fixed probe batch; default the training batch size (M2:
            its unlabelled points, beside one labelled batch).
        khat_points: test points whose PSIS :math:`\hat k` is computed (the first ones of the
            test split); 0 skips k-hat.
        khat_samples: importance samples per point for k-hat; default the config's
            ``log_likelihood_samples`` (M2: z per class, default 100).
        posterior_points: test points (a count of the first ones, or indices) whose posterior
            draws are saved as NetCDF.
        posterior_draws: draws per point.
        isolate: run each (estimator, seed) in a fresh process, which makes the CPU peak-RSS
            column meaningful; with ``False`` runs share this process and CPU memory is not
            reported (CUDA memory is, either way).
        overwrite: replace the outputs of an earlier comparison in ``out``.
        fit_figures: let every run write ``fit``'s own figures into its run directory.
        dataset: an already-loaded :class:`~ppl_vae.data.Dataset` instead of ``config.data``.
        quiet: no progress lines (and no progress bars from ``fit``).
        **options: fields of the kind's config class.

    Returns:
        A :class:`CompareResult`.

    Raises:
        ConfigError: an unknown or unusable estimator or label guide, a bad option, or an
            existing ``out`` (without ``overwrite``), before anything is trained or written.

    Example:
        >>> res = compare_estimators(["trace", "iwae:5"], [0, 1], epochs=5)  # doctest: +SKIP
        >>> m2 = compare_estimators("auto", None, kind="m2", label_guides="enumerate,relaxed",
        ...                         labels=50, epochs=5)  # doctest: +SKIP
        >>> print(res.markdown())  # doctest: +SKIP
    """
    # -- validate everything before training ------------------------------------------------
    cls = _config_class(kind, config)
    base = config_as_dict(cls, config)
    base.pop("kind", None)
    if "estimator" in options:
        raise ConfigError("pass the estimators as `estimators`, not as the option `estimator`")
    base.update(options)
    cfg = cls.from_dict(base)
    kind_name = cfg.kind
    if kind is not None and kind != kind_name:
        raise ConfigError(
            f"kind {kind!r} asked for, but the options give kind {kind_name!r}"
            + (" (`model` names a user's pair)" if kind_name == "user" else " (no `model` given)")
        )
    m2 = kind_name == "m2"
    if not m2 and label_guides is not None:
        raise ConfigError(f"`label_guides` apply to the M2 kind only, not to kind {kind_name!r}")
    seed_list = _as_seed_list([cfg.seed] if seeds is None else seeds)
    rows: list[tuple[str, str]] = []
    if m2:
        from .compare_m2 import parse_rows

        rows = parse_rows(estimators, label_guides, cfg.label_guide)
        specs = []
    else:
        specs = _as_spec_list(DEFAULT_ESTIMATORS if estimators is None else estimators)
        for spec in specs:
            make_elbo(spec, cfg.num_particles, cfg.vectorize_particles, max_plate_nesting=1)
    points = (
        default_grad_points(cfg.epochs)
        if grad_points is None
        else tuple(sorted({_positive_int("grad_points", e) for e in grad_points}))
    )
    if points and points[-1] > cfg.epochs:
        raise ConfigError(
            f"`grad_points` must be epochs in 1..{cfg.epochs} (`epochs`), got {list(points)}"
        )
    _positive_int("grad_repeats", grad_repeats, 2)
    batch_size = cfg.batch_size if grad_batch_size is None else grad_batch_size
    _positive_int("grad_batch_size", batch_size)
    _positive_int("khat_points", khat_points, 0)
    if khat_samples is not None:
        k_samples = khat_samples
    else:
        k_samples = M2_LOG_LIKELIHOOD_SAMPLES if m2 else cfg.log_likelihood_samples
    _positive_int("khat_samples", k_samples, 2)
    if isinstance(posterior_points, int) and not isinstance(posterior_points, bool):
        post_index = tuple(range(_positive_int("posterior_points", posterior_points, 0)))
    elif isinstance(posterior_points, Sequence):
        post_index = tuple(_positive_int("posterior_points", i, 0) for i in posterior_points)
    else:
        raise ConfigError(
            f"`posterior_points` must be a count or a list of test indices, got {posterior_points!r}"
        )
    _positive_int("posterior_draws", posterior_draws, 0)
    device = resolve_device(cfg.device)
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        _check_out(out_dir, overwrite)

    # -- every run's job, after a preflight of every estimator (and label guide) ----------------
    jobs: list[RunJob] = []
    names: list[str] = []
    common = dict(
        grad_points=points,
        grad_repeats=grad_repeats,
        grad_batch_size=batch_size,
        khat_points=khat_points,
        khat_samples=k_samples,
        posterior_index=post_index,
        posterior_draws=posterior_draws,
        quiet=quiet,
        fit_figures=fit_figures,
        isolated=isolate,
        num_threads=torch.get_num_threads(),
    )
    groups = list(_GROUPS)
    if m2:
        assert isinstance(cfg, SSLConfig)
        from .compare_m2 import plan_m2, row_config, run_name

        plan = plan_m2(cfg, rows, seed_list, dataset)
        groups = plan.groups
        specs = list(dict.fromkeys(r[0] for r in plan.rows))
        data_seed = cfg.seed
        for (est, guide, particles, given), seed in ((r, s) for r in plan.rows for s in seed_list):
            name = run_name(est, guide, seed)
            while name in names:
                name += "-2"
            names.append(name)
            jobs.append(
                RunJob(
                    config=row_config(cfg, given, guide, seed).to_dict(),
                    data_seed=seed,
                    dataset=dataset,
                    run_dir=str(out_dir / "runs" / name) if out_dir is not None else None,
                    kind="m2",
                    row=(est, guide, particles),
                    reference=plan.references[seed],
                    **common,  # type: ignore[arg-type]
                )
            )
    else:
        data_seed = cfg.split_seed
        data = dataset if dataset is not None else _load_dataset(cfg, data_seed)
        _preflight(cfg, data, specs)
        for spec, seed in ((sp, s) for sp in specs for s in seed_list):
            d = cfg.to_dict()
            d.update(estimator=spec, seed=seed)
            name = _run_name(spec, seed)
            jobs.append(
                RunJob(
                    config=d,
                    data_seed=data_seed,
                    dataset=dataset,
                    run_dir=str(out_dir / "runs" / name) if out_dir is not None else None,
                    **common,  # type: ignore[arg-type]
                )
            )

    # -- run ---------------------------------------------------------------------------------
    if out_dir is not None:
        _clear_outputs(out_dir)
        (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    runs: list[RunRecord] = []
    for i, job in enumerate(jobs):
        t0 = time.perf_counter()
        record = _run_isolated(job) if isolate else _run_one(job)
        record.khat = _khat(record.khat_log_weights)
        runs.append(record)
        if not quiet:
            m = record.metrics
            what = record.status
            if record.status == "ok":
                what = f"test ELBO {m['test_elbo']:.2f}"
                if "test_accuracy" in m:
                    what = f"test accuracy {m['test_accuracy']:.4f}, {what}"
            print(
                f"[{i + 1}/{len(jobs)}] {record.label} seed {record.seed}: {what} "
                f"({time.perf_counter() - t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )

    memory = ["cuda_peak_allocated_mb"] if device.type == "cuda" else []
    if isolate:
        memory = ["rss_peak_train_mb", "rss_baseline_mb", "rss_train_increase_mb", *memory]
    labels = list(dict.fromkeys(r.label for r in runs))
    meta = {
        "kind": kind_name,
        "estimators": specs,
        "rows": labels,
        "label_guides": list(dict.fromkeys(g for _, g in rows)) if m2 else [],
        "groups": groups,
        "monitor": "val_accuracy" if m2 else "val_elbo",
        "seeds": seed_list,
        "epochs": cfg.epochs,
        "grad_points": list(points),
        "grad_repeats": grad_repeats,
        "grad_batch_size": batch_size,
        "log_likelihood_samples": (
            M2_TRAIN_LOG_LIKELIHOOD_SAMPLES if m2 else cfg.log_likelihood_samples
        ),
        "khat_points": khat_points,
        "khat_samples": k_samples,
        "data": cfg.data,
        "data_seed": data_seed,
        "device": str(device),
        "isolate": isolate,
        "memory_columns": memory,
        "config": cfg.to_dict(),
        "torch_threads": torch.get_num_threads(),
    }
    table = [_row(r, meta) for r in runs]
    result = CompareResult(table, _summarise(table, labels), runs, meta, out_dir)
    if out_dir is not None:
        result.files = _write_outputs(result, out_dir)
    return result


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"`out` {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(
            f"output directory {str(out)!r} already exists and is not empty; pass overwrite=True "
            "(--overwrite) to replace an earlier comparison there"
        )


def _clear_outputs(out: Path) -> None:
    """Remove an earlier comparison's outputs (only the names this module writes)."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _arviz() -> Any:
    """Import arviz without its once-a-day refactoring ``FutureWarning``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _khat(lw: np.ndarray | None) -> np.ndarray | None:
    """PSIS k-hat per row of ``(points, samples)`` log weights (arviz ``psislw``, reff = 1)."""
    if lw is None or lw.shape[0] == 0:
        return None
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, khat = az.psislw(np.ascontiguousarray(lw), reff=1.0)
    return np.asarray(khat, dtype=float).reshape(-1)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _row(r: RunRecord, meta: dict[str, Any]) -> dict[str, Any]:
    m2 = meta["kind"] == "m2"
    row: dict[str, Any] = {"estimator": r.estimator}
    if m2:
        row["label_guide"] = r.label_guide
    row.update(
        seed=r.seed,
        num_particles=r.num_particles,
        status=r.status if r.status == "ok" else r.status.splitlines()[0][:200],
        epochs=meta["epochs"],
    )
    ok = r.status == "ok"
    m = r.metrics
    nan = math.nan
    if m2:
        row["test_accuracy"] = m.get("test_accuracy", nan) if ok else nan
    row["test_elbo"] = m.get("test_elbo", nan) if ok else nan
    if m2:
        row["test_elbo_se"] = m.get("test_elbo_se", nan) if ok else nan
    row["test_log_likelihood"] = m.get("test_log_likelihood", nan) if ok else nan
    row["test_log_likelihood_se"] = m.get("test_log_likelihood_se", nan) if ok else nan
    row["log_likelihood_samples"] = meta["log_likelihood_samples"]
    if m2:
        row["best_val_accuracy"] = m.get("best_val_accuracy", nan) if ok else nan
        row["final_val_accuracy"] = m.get("final_val_accuracy", nan) if ok else nan
        row["best_epoch"] = m.get("best_epoch", nan) if ok else nan
    else:
        row["final_val_elbo"] = m.get("final_val_elbo", nan) if ok else nan
        row["best_val_elbo"] = m.get("best_val_elbo", nan) if ok else nan
    secs = [h["seconds"] for h in r.history]
    row["seconds_per_epoch"] = float(np.mean(secs)) if secs else nan
    row["train_seconds"] = float(np.sum(secs)) if secs else nan
    row["fast_path"] = _fast_path_cell(r.fast_path_steps, r.fast_path_partly)
    row["fast_path_steps"] = r.fast_path_steps if r.fast_path_steps is not None else nan
    row["pyro_steps"] = r.pyro_steps if r.pyro_steps is not None else nan
    for e in meta["grad_points"]:
        g = r.gradients.get(e, {})
        for group in meta["groups"]:
            row[f"snr_{group}_e{e}"] = g.get(f"snr_{group}", nan)
            row[f"grad_var_{group}_e{e}"] = g.get(f"grad_var_{group}", nan)
    if meta["khat_points"] > 0:
        k = r.khat
        row["khat_mean"] = float(np.mean(k)) if k is not None else nan
        row["khat_max"] = float(np.max(k)) if k is not None else nan
        row["khat_frac_above_0.7"] = float(np.mean(k > KHAT_THRESHOLD)) if k is not None else nan
        row["khat_points"] = len(k) if k is not None else 0
        row["khat_samples"] = meta["khat_samples"]
    mem = dict(r.memory)
    if "rss_peak_train_mb" in mem and "rss_baseline_mb" in mem:
        mem["rss_train_increase_mb"] = mem["rss_peak_train_mb"] - mem["rss_baseline_mb"]
    for name in meta["memory_columns"]:
        row[name] = mem.get(name, nan) if ok else nan
    row["init_digest"] = r.init_digest
    if m2:
        row["init_from_reference"] = r.init_from_reference
    row["device"] = meta["device"]
    row["run_dir"] = r.run_dir or ""
    return row


def _fast_path_cell(fast_steps: int | None, partly: bool = False) -> str:
    """``yes`` if training steps ran on the fused fast path, ``no`` if all ran Pyro's ELBO,
    ``partly`` if some of the loss's terms ran Pyro's ELBO at every step."""
    if fast_steps is None:
        return "n/a"
    return ("partly" if partly else "yes") if fast_steps > 0 else "no"


_NON_NUMERIC = (
    "estimator",
    "label_guide",
    "seed",
    "status",
    "fast_path",
    "init_digest",
    "init_from_reference",
    "device",
    "run_dir",
)


def _label_of(row: Mapping[str, Any]) -> str:
    """A table row's name, as :attr:`RunRecord.label`."""
    guide = row.get("label_guide")
    return row["estimator"] if guide is None else f"{row['estimator']} @ {guide}"


def _summarise(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    out = []
    for label in labels:
        mine_all = [r for r in rows if _label_of(r) == label]
        mine = [r for r in mine_all if r["status"] == "ok"]
        first = mine_all[0]
        s: dict[str, Any] = {"estimator": first["estimator"]}
        if "label_guide" in first:
            s["label_guide"] = first["label_guide"]
        s.update(n=len(mine), runs=len(mine_all))
        if "fast_path" in first:
            paths = {r["fast_path"] for r in mine} or {"n/a"}
            s["fast_path"] = paths.pop() if len(paths) == 1 else "mixed"
        for key in rows[0]:
            if key in _NON_NUMERIC:
                continue
            vals = np.array([float(r[key]) for r in mine], dtype=float)
            vals = vals[np.isfinite(vals)]
            s[key] = float(vals.mean()) if len(vals) else math.nan
            s[f"{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else math.nan
        out.append(s)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        cols = list(rows[0])
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in cols])
    return buf.getvalue()


def _pm(s: dict[str, Any], key: str, fmt: str, scale: float = 1.0) -> str:
    mean = s.get(key, math.nan)
    sd = s.get(f"{key}_sd", math.nan)
    if mean is None or math.isnan(mean):
        return "n/a"
    text = format(mean * scale, fmt)
    if not math.isnan(sd):
        text += " ± " + format(sd * scale, fmt)
    return text


_SHORT = {"encoder": "enc.", "decoder": "dec.", "classifier": "cls."}


def _markdown(res: CompareResult) -> str:
    meta = res.meta
    m2 = meta["kind"] == "m2"
    last = meta["grad_points"][-1] if meta["grad_points"] else None
    k_ll = meta["log_likelihood_samples"]
    cols: list[tuple[str, str, str, float]] = []
    if m2:
        cols.append(("test accuracy", "test_accuracy", ".4f", 1.0))
    cols += [
        ("test ELBO", "test_elbo", ".2f", 1.0),
        (
            f"test log p(x) (K={k_ll}{' per class' if m2 else ''})",
            "test_log_likelihood",
            ".2f",
            1.0,
        ),
    ]
    if last is not None:
        for stat, prefix in (("SNR", "snr"), ("grad var", "grad_var")):
            cols += [
                (f"{stat} {_SHORT.get(g, g)} (ep. {last})", f"{prefix}_{g}_e{last}", ".3g", 1.0)
                for g in meta["groups"]
            ]
    if meta["khat_points"] > 0:
        cols += [
            ("k-hat mean", "khat_mean", ".2f", 1.0),
            ("k-hat > 0.7 (%)", "khat_frac_above_0.7", ".0f", 100.0),
        ]
    cols.append(("s / epoch", "seconds_per_epoch", ".3g", 1.0))
    fast_column = any("fast_path" in s for s in res.summary)
    if "rss_train_increase_mb" in meta["memory_columns"]:
        cols.append(("peak RSS, process (MiB)", "rss_peak_train_mb", ".0f", 1.0))
        cols.append(("RSS increase in training (MiB)", "rss_train_increase_mb", ".1f", 1.0))
    if "cuda_peak_allocated_mb" in meta["memory_columns"]:
        cols.append(("CUDA peak alloc. (MiB)", "cuda_peak_allocated_mb", ".1f", 1.0))
    header = ["estimator", *(["label guide"] if m2 else []), "K", "seeds", *[c[0] for c in cols]]
    if fast_column:
        header.append("fast path")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * (2 if m2 else 1) + ["--:"] * (len(header) - 1 - m2)) + "|",
    ]
    for s in res.summary:
        k = s.get("num_particles", math.nan)
        cells = [f"`{s['estimator']}`"]
        if m2:
            cells.append(f"`{s['label_guide']}`")
        cells += ["n/a" if math.isnan(k) else f"{k:.0f}", f"{s['n']}/{s['runs']}"]
        cells += [_pm(s, key, fmt, scale) for _, key, fmt, scale in cols]
        if fast_column:
            cells.append(s.get("fast_path", "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    cfg = meta["config"]
    model = (
        f"model: prior `{cfg['prior']}`, likelihood `{cfg['likelihood']}`, latent_dim "
        f"{cfg['latent_dim']}, hidden_dims {cfg['hidden_dims']}"
    )
    if m2:
        labelled_batch = cfg["labelled_batch_size"] or cfg["batch_size"]
        if isinstance(cfg["labels"], int):  # at most the labels (the kind's own rule)
            labelled_batch = min(labelled_batch, cfg["labels"])
        notes = [
            "",
            f"M2 (Kingma et al. 2014), mean ± sd over seeds {meta['seeds']} (`seeds` = "
            f"finished/started; each seed fixes the data split, the labelled subset and the "
            f"initial weights of every row). Data: `{meta['data']}`, labels {cfg['labels']}; "
            f"{model}; alpha {cfg['alpha']}; {meta['epochs']} epochs, batch {cfg['batch_size']} "
            f"unlabelled + {labelled_batch} labelled, lr "
            f"{cfg['lr']}; device `{meta['device']}`, {meta['torch_threads']} torch thread(s).",
            "Estimator: of the labelled and the unlabelled bound (`auto` rows: the label guide's "
            "own, shown resolved). Accuracy: the classifier q(y|x)'s most probable class on the "
            "test split, with the weights of the best validation accuracy (as `ppl-vae ssl`). "
            "Test ELBO: the unlabelled bound with y summed out exactly "
            f"({cfg['elbo_samples']} z per class); log p(x): importance-sampled with y summed out "
            f"exactly, K = {k_ll} z per class; nats per test point.",
        ]
    else:
        notes = [
            "",
            f"Mean ± sd over seeds {meta['seeds']} (`seeds` = finished/started). Data: "
            f"`{meta['data']}` (split seed {meta['data_seed']}); {model}; {meta['epochs']} "
            f"epochs, batch {cfg['batch_size']}, lr {cfg['lr']}; device `{meta['device']}`, "
            f"{meta['torch_threads']} torch thread(s).",
            "ELBO and log-likelihood in nats per test point; log p(x) is the importance-sampled "
            f"estimate with K = {k_ll} draws from q.",
        ]
    if last is not None:
        if m2:
            groups = ", ".join(meta["groups"])
            notes.append(
                f"Gradient SNR = |mean| / sd per parameter, averaged over each group's parameters "
                f"({groups}); variance = mean per-parameter variance of the gradient of the M2 "
                f"step loss (labelled bound, unlabelled bound and classification term) on one "
                f"fixed batch of {meta['grad_batch_size']} unlabelled and one labelled batch of "
                f"training points; {meta['grad_repeats']} evaluations after epochs "
                f"{meta['grad_points']} (last shown; all in compare.csv)."
            )
        else:
            notes.append(
                f"Gradient SNR = |mean| / sd per parameter, averaged over the encoder's "
                f"(decoder's) parameters; variance = mean per-parameter variance of the gradient "
                f"of the loss summed over one fixed batch of {meta['grad_batch_size']} training "
                f"points; {meta['grad_repeats']} evaluations after epochs {meta['grad_points']} "
                "(last shown; all in compare.csv)."
            )
    if meta["khat_points"] > 0:
        what = (
            f"the {meta['khat_samples']} importance weights per class, pooled over the classes,"
            if m2
            else f"{meta['khat_samples']} importance weights"
        )
        notes.append(
            f"k-hat: PSIS Pareto shape of {what} of each of {meta['khat_points']} test points "
            "(arviz psislw); > 0.7 means q is an unreliable proposal for that point."
        )
    notes.append(
        "Seconds per epoch: training steps plus the per-epoch validation "
        + ("accuracy." if m2 else "ELBO.")
    )
    if fast_column:
        notes.append(
            "Fast path: `yes` where the training steps after the first (validated) one ran the "
            "fused fast path ("
            + ("ppl_vae/inference/m2_fastpath.py" if m2 else "ppl_vae/inference/fastpath.py")
            + ": Pyro's loss and gradients, bit for bit, without Pyro's tracing), `no` where "
            "every step ran Pyro's ELBO"
            + (
                ", `partly` where some of the step's terms ran Pyro's ELBO throughout."
                if m2
                else "."
            )
            + " Seconds per epoch of a `yes` row and a `no` row differ "
            "by implementation as well as by estimator (fast_path_steps and pyro_steps in compare.csv count "
            + (
                "the fast term evaluations: labelled, unlabelled, classification)."
                if m2
                else "the fast steps)."
            )
        )
    if "rss_train_increase_mb" in meta["memory_columns"]:
        notes.append(
            "Memory on CPU: each run in a fresh process; peak RSS is the process's peak resident "
            "set size (ru_maxrss) at the end of training, interpreter and libraries included; "
            "the increase is that minus the peak before training began."
        )
    elif "cuda_peak_allocated_mb" not in meta["memory_columns"]:
        notes.append("Peak memory: not measured (runs shared one process, isolate=False).")
    if "cuda_peak_allocated_mb" in meta["memory_columns"]:
        notes.append("CUDA memory: torch.cuda.max_memory_allocated over training.")
    aligned = [r for r in res.rows if r.get("init_from_reference")]
    if aligned:
        which = sorted({_label_of(r) for r in aligned})
        notes.append(
            f"Rows {which} drew other initial weights for the shared networks in their own build "
            "and started from the first row's (init_from_reference in compare.csv)."
        )
    failed = [r for r in res.rows if r["status"] != "ok"]
    for r in failed:
        notes.append(f"Run `{_label_of(r)}` seed {r['seed']} did not finish: {r['status']}")
    return "\n".join(lines + notes) + "\n"


# --------------------------------------------------------------------------------------------
# Files and figures
# --------------------------------------------------------------------------------------------
def _figure(**kwargs: Any) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _colors(labels: list[str]) -> dict[str, str]:
    return {s: f"C{i % 10}" for i, s in enumerate(labels)}


def _key_columns(r: RunRecord) -> dict[str, Any]:
    """A run's identifying columns in curves.csv and khat.csv."""
    out: dict[str, Any] = {"estimator": r.estimator}
    if r.label_guide is not None:
        out["label_guide"] = r.label_guide
    out["seed"] = r.seed
    return out


def _write_outputs(res: CompareResult, out: Path) -> list[Path]:
    files = []
    m2 = res.meta["kind"] == "m2"
    monitor = res.meta["monitor"]
    write_text_atomic(out / "compare.csv", _csv_text(res.rows))
    write_text_atomic(out / "compare.md", res.markdown())
    files += [out / "compare.csv", out / "compare.md"]
    curves = []
    for r in res.runs:
        elapsed = 0.0
        for h in r.history:
            elapsed += h["seconds"]
            curves.append(
                {
                    **_key_columns(r),
                    "epoch": int(h["epoch"]),
                    "train_loss": h["loss" if m2 else "train_loss"],
                    monitor: h[monitor],
                    "seconds": h["seconds"],
                    "elapsed_seconds": elapsed,
                }
            )
    write_text_atomic(out / "curves.csv", _csv_text(curves))
    files.append(out / "curves.csv")
    if res.meta["khat_points"] > 0:
        krows = [
            {**_key_columns(r), "test_index": i, "khat": float(k)}
            for r in res.runs
            if r.khat is not None
            for i, k in enumerate(r.khat)
        ]
        write_text_atomic(out / "khat.csv", _csv_text(krows))
        files.append(out / "khat.csv")
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    name = "accuracy_vs_time.png" if m2 else "elbo_vs_time.png"
    files.append(_monitor_vs_time(res, fig_dir / name))
    snr = _snr_vs_k(res, fig_dir / "snr_vs_k.png")
    if snr is not None:
        files.append(snr)
    if res.meta["khat_points"] > 0 and any(r.khat is not None for r in res.runs):
        files.append(_khat_figure(res, fig_dir / "khat.png"))
    files += _write_posteriors(res)
    return files


def _monitor_vs_time(res: CompareResult, path: Path) -> Path:
    """The validation metric (ELBO; M2: accuracy) of every run against its training time."""
    m2 = res.meta["kind"] == "m2"
    monitor = res.meta["monitor"]
    colors = _colors(res.meta["rows"])
    fig = _figure(figsize=(7, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    labelled: set[str] = set()
    for r in res.runs:
        if not r.history:
            continue
        t = np.cumsum([h["seconds"] for h in r.history])
        y = [h[monitor] for h in r.history]
        label = None if r.label in labelled else r.label
        labelled.add(r.label)
        ax.plot(t, y, color=colors[r.label], lw=1.2, alpha=0.8, label=label, marker=".")
    ax.set_xlabel("training wall time (s, validation included)")
    what = "Accuracy" if m2 else "ELBO"
    ax.set_ylabel("validation accuracy" if m2 else "validation ELBO (nats per point)")
    row = "row" if m2 else "estimator"
    ax.set_title(f"{what} against wall time ({len(res.meta['seeds'])} seed(s) per {row})")
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _snr_vs_k(res: CompareResult, path: Path) -> Path | None:
    """SNR against K for ``iwae:K`` and ``dreg:K`` runs, at the last probe; None if none ran.

    One panel per gradient group; one line per family (M2: per family and label guide).
    """
    if not res.meta["grad_points"]:
        return None
    last = res.meta["grad_points"][-1]
    groups = res.meta["groups"]
    families: dict[str, dict[int, list[tuple[float, ...]]]] = {}
    for r in res.runs:
        name = r.estimator.partition(":")[0]
        if name not in ("iwae", "dreg") or last not in r.gradients:
            continue
        if r.label_guide is not None:
            name = f"{name} @ {r.label_guide}"
        g = r.gradients[last]
        families.setdefault(name, {}).setdefault(r.num_particles, []).append(
            tuple(g.get(f"snr_{group}", math.nan) for group in groups)
        )
    if not families:
        return None
    # a group no such run has (the baseline of a guide without one) gets no panel
    shown = [
        (j, group)
        for j, group in enumerate(groups)
        if any(
            math.isfinite(v[j]) for by_k in families.values() for vs in by_k.values() for v in vs
        )
    ]
    if not shown:
        return None
    fig = _figure(figsize=(4.5 * len(shown), 4))
    for panel, (j, group) in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), panel + 1)
        for i, (name, by_k) in enumerate(sorted(families.items())):
            ks = sorted(by_k)
            vals = [np.array([v[j] for v in by_k[k]], dtype=float) for k in ks]
            with warnings.catch_warnings():  # a group a row lacks (a baseline) is all NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = [float(np.nanmean(v)) for v in vals]
                sd = [float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0 for v in vals]
            ax.errorbar(ks, mean, yerr=sd, marker="o", capsize=3, color=f"C{i}", label=name)
        ax.set_xscale("log")
        all_k = sorted({k for by_k in families.values() for k in by_k})
        ax.set_xticks(all_k, [str(k) for k in all_k])
        ax.minorticks_off()
        ax.set_xlabel("K (importance samples)")
        ax.set_ylabel(f"mean SNR of the {group} gradient")
        ax.set_title(f"{group} (after epoch {last})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Gradient SNR against K (mean ± sd over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _khat_figure(res: CompareResult, path: Path) -> Path:
    """``az.plot_khat`` of each row's first seed with k-hats, one panel per row."""
    az = _arviz()
    firsts: list[RunRecord] = []
    for label in res.meta["rows"]:
        mine = [r for r in res.runs if r.label == label and r.khat is not None]
        if mine:
            firsts.append(mine[0])
    n = len(firsts)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = _figure(figsize=(4.2 * cols, 3.3 * rows))
    for i, r in enumerate(firsts):
        ax = fig.add_subplot(rows, cols, i + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_khat(r.khat, ax=ax, show_hlines=True, textsize=9, show=False)
        ax.set_title(f"{r.label} (seed {r.seed})", fontsize=9)
        ax.set_xlabel("test point")
    per = " per class, pooled" if res.meta["kind"] == "m2" else ""
    fig.suptitle(
        f"PSIS k-hat of each test point's importance weights ({res.meta['khat_samples']} "
        f"draws{per})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _write_posteriors(res: CompareResult) -> list[Path]:
    az = _arviz()
    files = []
    for r in res.runs:
        if r.posterior_z is None or r.run_dir is None:
            continue
        sites = r.posterior_z
        points = next(iter(sites.values())).shape[1]
        x = r.posterior_x.reshape(points, -1) if r.posterior_x is not None else None
        # one latent-dimension coordinate per site: "latent_dim" for the VAE's z, else "<site>_dim"
        dim_name = {name: "latent_dim" if name == "z" else f"{name}_dim" for name in sites}
        attrs: dict[str, Any] = {"estimator": r.estimator, "seed": r.seed}
        if r.label_guide is not None:
            attrs["label_guide"] = r.label_guide
            attrs["description"] = (
                "draws (y, z) ~ q(y|x) q(z|x,y) of the trained guide for test points (y one-hot), "
                "with log importance weights log p(x, y, z) - log q(y, z|x) (unscaled)"
            )
        else:
            attrs["description"] = (
                "draws z ~ q(z|x) of the trained guide for test points, with log importance "
                "weights log p(x, z) - log q(z|x) (unscaled)"
            )
        data = az.from_dict(
            posterior={name: v[None] for name, v in sites.items()},
            sample_stats={"log_weight": r.posterior_log_weights[None]},
            observed_data={"x": x} if x is not None else None,
            coords={
                "test_point": list(r.posterior_index),
                **{dim_name[n]: list(range(v.shape[2])) for n, v in sites.items()},
                "pixel": list(range(x.shape[1])) if x is not None else [],
            },
            dims={
                **{n: ["test_point", dim_name[n]] for n in sites},
                "log_weight": ["test_point"],
                "x": ["test_point", "pixel"],
            },
            attrs=attrs,
        )
        path = Path(r.run_dir) / "posterior.nc"
        data.to_netcdf(str(path))
        files.append(path)
    return files
