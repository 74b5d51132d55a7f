r"""The M2 side of :func:`~ppl_vae.runs.compare.compare_estimators`: rows of (estimator, label guide).

A row trains Kingma et al.'s M2 model (:class:`~ppl_vae.ssl.SSVAE`) with :func:`~ppl_vae.ssl.fit_ssl`
itself, with one ELBO estimator (:attr:`~ppl_vae.config.SSLConfig.estimator`; ``auto`` is the label
guide's own) and one label guide. Within a seed every row has the same data split, the same
class-balanced labelled subset and the same initial weights of every parameter the rows share
(the encoder, the decoder, the classifier q(y|x), the prior's and the likelihood's): those of
the first row, which is what ``fit_ssl`` builds for it. A row whose own build draws other shared
weights (the ``sample`` guide builds its baseline network before the encoder and the decoder)
starts from the first row's (``init_from_reference`` in ``compare.csv``); its run directory then
does not reproduce bit for bit with ``ppl-vae ssl --config``. ``init_digest`` is the hash of the
shared weights training started from.

Measured per row, besides what the run's own evaluation reports (:meth:`~ppl_vae.kinds.m2.M2Kind.
evaluate`: test accuracy, the test ELBO and the importance-sampled log p(x), both with y summed
out exactly):

- the gradient variance and SNR of the **full M2 step loss** :math:`J` (labelled bound,
  unlabelled bound, classification term: :meth:`~ppl_vae.kinds.m2.M2Kind.loss`) on one fixed batch
  of ``grad_batch_size`` unlabelled and one labelled batch of labelled training points, per
  group: ``encoder``, ``decoder``, ``classifier`` (the label guide's network) and ``baseline``
  (the ``sample`` guide's control variate, where a row has one). Prior and likelihood parameters
  are in no group. As for the VAE, the probe runs at the end of chosen epochs with every random
  stream and buffer restored, so the trajectory is the unmeasured one;
- PSIS :math:`\hat k` of the importance weights behind log p(x): with ``S`` draws
  :math:`z_{ks} \sim q(z \mid x, k)` per class, the ``K S`` weights
  :math:`p(x, k, z_{ks}) / q(z_{ks} \mid x, k)` pooled (their mean times K is the estimate of
  :math:`p(x)` with y summed out exactly, a stratified importance sampler);
- posterior draws :math:`(y, z) \sim q(y \mid x)\, q(z \mid x, y)` (y one-hot) in ``posterior.nc``.
"""

from __future__ import annotations

import functools
import io
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro
import torch

from ..config import SSLConfig
from ..data import Dataset
from ..inference.estimators import parse_estimator
from ..inference.scoring import log_weights
from ..kinds.m2 import M2Kind
from ..models.errors import ConfigError
from ..training import Callback, TrainingError
from ..training.optim import make_adam
from ..training.setup import initialize_from_data, resolve_device
from .compare import (
    RunJob,
    RunRecord,
    StepPathCounter,
    canonical_estimator,
    gradient_statistics,
    maxrss_mb,
    posterior_draws,
    preserved_rng,
    weights_digest,
)

if TYPE_CHECKING:
    from ..training.trainer import Trainer

__all__ = [
    "AUTO",
    "M2Plan",
    "M2Probe",
    "m2_groups",
    "m2_khat_log_weights",
    "parse_rows",
    "plan_m2",
    "row_config",
    "run_m2",
    "run_name",
]

#: The estimator of a row that trains each label guide with its own (``enum``, ``trace``, ...).
AUTO = "auto"
#: ``ESTIMATOR@GUIDE``: one row with that pair.
PAIR_SEPARATOR = "@"


def parse_rows(
    estimators: Sequence[str] | str | None,
    label_guides: Sequence[str] | str | None,
    default_guide: str,
) -> list[tuple[str, str]]:
    """The rows ``(estimator spec or 'auto', label guide)``, in order.

    Each entry of ``estimators`` is a spec (``trace``, ``iwae:5``, ``auto``), paired with every
    one of ``label_guides`` (default: ``default_guide``), or a pair ``ESTIMATOR@GUIDE``.
    """
    ests = _as_list(estimators, "estimators") if estimators is not None else [AUTO]
    guides = _as_list(label_guides, "label_guides") if label_guides is not None else None
    rows: list[tuple[str, str]] = []
    used_guides = False
    for e in ests:
        est, sep, guide = e.partition(PAIR_SEPARATOR)
        est = est.strip()
        if sep:
            if not guide.strip():
                raise ConfigError(f"row {e!r} has no label guide after {PAIR_SEPARATOR!r}")
            rows.append((_estimator(est), guide.strip()))
        else:
            used_guides = True
            rows += [(_estimator(est), g) for g in (guides or [default_guide])]
    if guides is not None and not used_guides:
        raise ConfigError(
            f"`label_guides` {guides} pair with estimators given without a guide, but every "
            f"entry of `estimators` is an ESTIMATOR{PAIR_SEPARATOR}GUIDE pair: drop one of them"
        )
    return rows


def _as_list(values: Sequence[str] | str, name: str) -> list[str]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    if (
        not isinstance(values, Sequence)
        or not values
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise ConfigError(f"`{name}` must be a non-empty list of names, got {values!r}")
    return [v.strip() for v in values]


def _estimator(spec: str) -> str:
    if spec.lower() == AUTO:
        return AUTO
    parse_estimator(spec)  # the one-line error for an unknown or malformed spec
    return canonical_estimator(spec)


def row_config(cfg: SSLConfig, estimator: str, guide: str, seed: int) -> SSLConfig:
    """The row's :class:`SSLConfig`: ``cfg`` with this estimator (None for ``auto``), label
    guide and seed, and no supervised baseline (it does not depend on the row)."""
    d = cfg.to_dict()
    d.update(
        label_guide=guide,
        estimator=None if estimator == AUTO else estimator,
        seed=seed,
        baseline=None,
    )
    return SSLConfig.from_dict(d)


@dataclass
class M2Plan:
    """What :func:`plan_m2` found, before any training.

    Attributes:
        rows: per row ``(resolved estimator, label guide, num_particles, estimator as given)``.
        shared: names of the state entries every row's model has (same shape and dtype).
        references: per seed, the first row's initial values of the shared entries (CPU).
        groups: the gradient groups of the rows (``baseline`` only if a row has one).
    """

    rows: list[tuple[str, str, int, str]]
    shared: tuple[str, ...]
    references: dict[int, dict[str, torch.Tensor]]
    groups: list[str]


def _built(cfg: SSLConfig, dataset: Dataset | None) -> Any:
    """``build_ssl_run`` on the CPU plus the data-dependent initialisation ``fit_ssl`` does."""
    from ..ssl import build_ssl_run

    built = build_ssl_run(cfg, dataset=dataset, device="cpu")
    initialize_from_data(built.model, built.splits[0])
    return built


def plan_m2(
    cfg: SSLConfig,
    rows: list[tuple[str, str]],
    seeds: list[int],
    dataset: Dataset | None,
) -> M2Plan:
    """Build every row's model and evaluate its step loss once, on the CPU: a bad label guide,
    an estimator that cannot train it, or a duplicate row fails here, before any training."""
    resolved: list[tuple[str, str, int, str]] = []
    states: list[dict[str, torch.Tensor]] = []
    groups: list[str] = []
    references: dict[int, dict[str, torch.Tensor]] = {}
    data = dataset
    with pyro.settings.context(module_local_params=True), preserved_rng():
        for est, guide in rows:
            rc = row_config(cfg, est, guide, seeds[0])
            built = _built(rc, data if not rc.svhn_extra else None)
            data = data if data is not None or rc.svhn_extra else built.dataset
            states.append({k: v.detach().clone() for k, v in built.model.state_dict().items()})
            what = f"estimator {est!r} with label guide {guide!r}"
            kind = M2Kind(
                built.model,
                built.config,
                built.dataset,
                built.splits,
                built.labelled,
                built.unlabelled,
                built.dynamic,
                torch.device("cpu"),
            )
            n = min(2, kind.n_l)
            try:
                loss = kind.loss(
                    kind.x_l[:n], kind.y_l[:n], kind.x_u[:2], n, max(1, len(kind.x_u[:2]))
                )
            except ConfigError as e:
                raise ConfigError(f"{what} cannot train this model: {e}") from None
            except (ValueError, NotImplementedError, RuntimeError) as e:
                text = str(e).splitlines()[0] if str(e) else ""
                raise ConfigError(
                    f"{what} cannot train this model: {type(e).__name__}: {text}"
                ) from None
            if not torch.is_tensor(loss) or not loss.requires_grad:
                raise ConfigError(f"{what} gives a loss without a gradient here")
            name = canonical_estimator(kind.estimator)
            if any(r[0] == name and r[1] == guide for r in resolved):
                raise ConfigError(
                    f"rows {rows} train the pair ({name!r}, {guide!r}) more than once "
                    f"({AUTO!r} is each label guide's own estimator)"
                )
            resolved.append((name, guide, int(kind.unlabelled_elbo.num_particles), est))
            for g in m2_groups(built.model):
                if g not in groups:
                    groups.append(g)
        first = states[0]
        shared = tuple(
            k
            for k, v in first.items()
            if all(k in s and s[k].shape == v.shape and s[k].dtype == v.dtype for s in states)
        )
        references[seeds[0]] = {k: first[k] for k in shared}
        for seed in seeds[1:]:
            built = _built(row_config(cfg, rows[0][0], rows[0][1], seed), dataset)
            state = built.model.state_dict()
            references[seed] = {k: state[k].detach().clone() for k in shared}
    return M2Plan(resolved, shared, references, groups)


def m2_groups(model: Any) -> dict[str, list[torch.Tensor]]:
    """The probe's parameter groups of an :class:`~ppl_vae.ssl.SSVAE`: ``encoder``, ``decoder``,
    ``classifier`` (the label guide but its ``baseline``) and ``baseline`` where there is one."""
    guide = model.label_guide
    baseline = getattr(guide, "baseline", None)
    in_baseline = (
        {id(p) for p in baseline.parameters()} if isinstance(baseline, torch.nn.Module) else set()
    )
    out = {
        "encoder": [p for p in model.encoder.parameters() if p.requires_grad],
        "decoder": [p for p in model.decoder.parameters() if p.requires_grad],
        "classifier": [
            p for p in guide.parameters() if p.requires_grad and id(p) not in in_baseline
        ],
    }
    if in_baseline:
        out["baseline"] = [p for p in baseline.parameters() if p.requires_grad]
    return out


class M2Probe(Callback):
    """Aligns a row's shared initial weights and measures the step loss's gradient statistics.

    ``on_train_start``: copies the reference initial values into the shared entries that differ
    (before any step; ``aligned`` says whether any did), records ``digest`` (the shared weights
    training starts from) and draws the fixed probe batch from the kind's own data with a
    generator seeded by ``seed``. ``on_epoch_end`` at the chosen epochs: gradient statistics of
    :meth:`~ppl_vae.kinds.m2.M2Kind.loss` on that batch, the module in training mode, with every
    random stream, buffer, the kind's ``parts`` and ``.grad`` left as they were.
    """

    def __init__(
        self,
        points: Sequence[int],
        repeats: int,
        seed: int,
        unlabelled_points: int,
        reference: Mapping[str, torch.Tensor] | None,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.points = set(points)
        self.repeats = repeats
        self.seed = seed
        self.unlabelled_points = unlabelled_points
        self.reference = dict(reference) if reference is not None else None
        self.on_call = on_call
        self.results: dict[int, dict[str, float]] = {}
        self.kind: M2Kind | None = None
        self.digest = ""
        self.aligned = False
        self.batch: tuple[Any, ...] = ()

    def on_train_start(self, trainer: Trainer) -> None:
        kind = trainer.kind
        assert isinstance(kind, M2Kind)
        self.kind = kind
        state = trainer.module.state_dict()
        if self.reference is not None:
            with torch.no_grad():
                for name, value in self.reference.items():
                    target = state[name]
                    if not torch.equal(target.cpu(), value):
                        target.copy_(value.to(target.device))
                        self.aligned = True
            self.digest = weights_digest({k: state[k] for k in self.reference})
        g = torch.Generator().manual_seed(self.seed)
        li = torch.randperm(kind.n_l, generator=g)[: kind.b_l]
        ui = torch.randperm(kind.n_u, generator=g)[: self.unlabelled_points]
        x_l, x_u = kind.x_l[li.to(kind.x_l.device)].cpu(), kind.x_u[ui.to(kind.x_u.device)].cpu()
        if kind.dynamic:  # binarised once: the probe measures the estimator, not the data noise
            x_l, x_u = torch.bernoulli(x_l, generator=g), torch.bernoulli(x_u, generator=g)
        device = kind.x_l.device
        self.batch = (
            x_l.to(device),
            kind.y_l[li.to(device)],
            x_u.to(device),
            len(li),
            max(1, len(ui)),
        )

    def on_epoch_end(self, trainer: Trainer, epoch: int, row: dict[str, float]) -> None:
        if self.on_call is not None:
            self.on_call()
        if epoch not in self.points:
            return
        t0 = time.perf_counter()
        kind, module = self.kind, trainer.module
        assert kind is not None
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        parts, dynamic, was = kind.parts, kind.dynamic, module.training
        kind.dynamic = False
        module.train()
        try:
            with preserved_rng():
                pyro.set_rng_seed(self.seed * 100_003 + epoch)
                stats = gradient_statistics(
                    lambda: kind.loss(*self.batch), m2_groups(module), self.repeats
                )
        finally:
            kind.parts, kind.dynamic = parts, dynamic
            module.train(was)
            with torch.no_grad():
                for name, b in module.named_buffers():
                    b.copy_(buffers[name])
        out: dict[str, float] = {}
        for group, s in stats.items():
            summary = s.summary()
            out[f"snr_{group}"] = summary["snr"]
            out[f"grad_var_{group}"] = summary["variance"]
        out["grad_probe_seconds"] = time.perf_counter() - t0
        self.results[epoch] = out


@torch.no_grad()
def m2_khat_log_weights(model: Any, x: torch.Tensor, samples: int) -> torch.Tensor:
    r"""``(N, K * samples)`` log weights :math:`\log p(x, k, z) - \log q(z \mid x, k)`,
    ``samples`` draws :math:`z \sim q(z \mid x, k)` per class k (unscaled, the guide in eval
    mode), classes in order: the pooled weights of the stratified estimate of log p(x)."""
    was = model.training
    model.eval()
    try:
        parts = []
        for k in range(model.num_classes):
            yk = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
            parts.append(
                log_weights(
                    functools.partial(model.model, y=yk),
                    functools.partial(model.guide, y=yk),
                    x,
                    samples,
                )
            )
        return torch.cat(parts, 0).T
    finally:
        model.train(was)


def _warm_up(cfg: SSLConfig, dataset: Dataset | None) -> None:
    """One step, a tiny evaluation and a checkpoint-like save on a throwaway model (the peak
    RSS read afterwards then holds the libraries and kernels training loads lazily)."""
    with pyro.settings.context(module_local_params=True), preserved_rng():
        built = _built(cfg, dataset)
        kind = M2Kind(
            built.model,
            built.config,
            built.dataset,
            built.splits,
            built.labelled,
            built.unlabelled,
            built.dynamic,
            torch.device("cpu"),
        )
        optimizer = make_adam(built.model.parameters(), lr=cfg.lr)
        n = min(2, kind.n_l)
        kind.loss(kind.x_l[:n], kind.y_l[:n], kind.x_u[:2], n, max(1, len(kind.x_u[:2]))).backward()
        optimizer.step()
        built.model.log_likelihood(built.splits[2][:2], 2)
        buf = io.BytesIO()
        torch.save({"model": built.model.state_dict(), "optimizer": optimizer.state_dict()}, buf)


def run_m2(job: RunJob) -> RunRecord:
    """Train and measure one (estimator, label guide, seed) row with :func:`~ppl_vae.ssl.fit_ssl`."""
    from ..ssl import fit_ssl

    if job.num_threads is not None:
        torch.set_num_threads(job.num_threads)
    cfg = SSLConfig.from_dict(job.config)
    assert job.row is not None
    estimator, guide, num_particles = job.row
    record = RunRecord(estimator, cfg.seed, num_particles, "ok", label_guide=guide)
    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    memory: dict[str, float] = {}
    if job.isolated:
        _warm_up(cfg, job.dataset)
        memory["rss_baseline_mb"] = maxrss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def read_memory() -> None:
        if job.isolated:
            memory["rss_peak_train_mb"] = maxrss_mb()
        if cuda:
            memory["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20

    probe = M2Probe(
        job.grad_points,
        job.grad_repeats,
        cfg.seed,
        job.grad_batch_size,
        job.reference,
        on_call=read_memory,
    )
    counter = StepPathCounter()
    try:
        result = fit_ssl(
            cfg,
            out=job.run_dir,
            quiet=job.quiet,
            dataset=job.dataset,
            figures=job.fit_figures,
            callbacks=[probe, counter],
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
    record.init_digest = probe.digest
    record.init_from_reference = probe.aligned

    model, kind = result.model, probe.kind
    assert kind is not None
    test_x = kind.test_x
    with pyro.settings.context(module_local_params=True), preserved_rng():
        pyro.set_rng_seed(cfg.seed + 7919)
        model.eval()
        if job.khat_points > 0:
            lw = m2_khat_log_weights(model, test_x[: job.khat_points], job.khat_samples)
            record.khat_log_weights = lw.double().cpu().numpy()
        if job.posterior_index and job.posterior_draws > 0:
            idx = [i for i in job.posterior_index if i < test_x.shape[0]]
            xp = test_x[idx]
            z, plw = posterior_draws(model, xp, job.posterior_draws)
            record.posterior_z = {k: v.double().cpu().numpy() for k, v in z.items()}
            record.posterior_log_weights = plw.double().cpu().numpy()
            record.posterior_x = xp.cpu().numpy()
            record.posterior_index = tuple(idx)
    return record


def run_name(estimator: str, guide: str, seed: int) -> str:
    """A directory name for a row: ``<estimator>-<guide>-seed<seed>`` (``:`` and paths made
    safe)."""
    tail = guide.replace("\\", "/").rsplit("/", 1)[-1]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{estimator}-{tail}").strip("-")
    return f"{safe}-seed{seed}"
