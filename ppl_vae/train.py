r"""Training: the SVI loop behind :func:`fit` and ``ppl-vae fit``.

Data live on the device as tensors and are batched by shuffled index. Each step evaluates the
chosen estimator's differentiable loss on the Pyro model/guide pair, then Adam steps. The KL
weight :math:`\beta \cdot \min(1, t / T_\text{warm-up})` is a ``poutine.scale`` on ``z``.

Every epoch ends with the validation ELBO and an atomic checkpoint (modules, optimiser, epoch,
history, RNG states, config), so ``resume=True`` continues to exactly the result an
uninterrupted run gives on CPU, wherever the previous process was killed. A run directory with
its ``config.toml`` but no checkpoint yet (killed in the first epoch) starts again from epoch 0
with its saved config; one without ``config.toml`` has nothing to resume and is started afresh
(leftover temporary files of interrupted writes do not count as contents and are cleared).

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop trains with DistributedDataParallel; see
:mod:`ppl_vae.distributed` for the conventions (shards, loss scaling, seeds, rank 0's I/O).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyro
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .components import spec_of
from .config import ConfigFile, FitConfig, write_text_atomic
from .data import Dataset, load_data
from .estimators import make_elbo
from .fastpath import build_loss
from .models.errors import ConfigError
from .optim import make_adam
from .scoring import Scores, bits_per_dim, mean_elbo, score, write_scores_csv
from .vae import VAE, build_vae

RUN_FILES = (
    "config.toml",
    "metrics.json",
    "history.csv",
    "scores.csv",
    ckpt.CHECKPOINT,
    ckpt.PREVIOUS,
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


@dataclass
class FitResult:
    """What :func:`fit` returns."""

    vae: VAE
    config: FitConfig
    dataset: Dataset
    history: list[dict[str, float]]
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    test_scores: Scores | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out``; refuse to touch an existing run unless resuming or overwriting.

    Leftover temporary files of interrupted atomic writes do not make a directory a run; they
    are removed when a fresh run starts in it.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    existing = out.is_dir() and any(not ckpt.is_temporary(p) for p in out.iterdir())
    if resume:
        if not existing:
            raise ConfigError(f"nothing to resume: run directory {str(out)!r} is missing or empty")
        if not (out / "config.toml").is_file():
            raise ConfigError(
                f"nothing to resume: run directory {str(out)!r} has no config.toml (the run "
                "stopped before it wrote one); start it again without --resume"
            )
        return
    if existing and not overwrite:
        raise ConfigError(
            f"run directory {str(out)!r} already exists; pass --resume to continue it or "
            "--overwrite to replace it"
        )
    if existing:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "figures", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.remove_temporaries(out)


def load_config_data(
    cfg: FitConfig,
    *,
    test_data: str | None = None,
    download: bool | None = None,
    seed: int | None = None,
) -> Dataset:
    """The data set a config names, split by its seed (or ``seed``); ``test_data`` replaces
    the test split; ``download`` overrides the config's flag."""
    return load_data(
        cfg.data,
        test_data=test_data if test_data is not None else cfg.test_data,
        root=cfg.data_root,
        download=cfg.download if download is None else download,
        binarize="static" if cfg.binarize == "static" else "none",
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        max_train=cfg.max_train,
        seed=cfg.seed if seed is None else seed,
    )


def build_config_vae(
    cfg: FitConfig, dataset: Dataset, prior: Any = None, likelihood: Any = None
) -> VAE:
    """The VAE a config describes, sized for ``dataset``; ``prior``/``likelihood`` may be classes
    or instances that replace the config's names (an instance brings its own options)."""
    return build_vae(
        dataset.data_shape,
        prior=prior if prior is not None else cfg.prior,
        likelihood=likelihood if likelihood is not None else cfg.likelihood,
        latent_dim=cfg.latent_dim,
        hidden_dims=cfg.hidden_dims,
        network=cfg.network,
        prior_args=None if isinstance(prior, torch.nn.Module) else cfg.prior_args,
        likelihood_args=None if isinstance(likelihood, torch.nn.Module) else cfg.likelihood_args,
        num_levels=dataset.num_levels,
    )


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def prepare_data(
    ds: Dataset, vae: VAE, binarize: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Resolve ``auto`` binarisation and check every split against the likelihood's support."""
    lik = vae.likelihood
    needs_binary = lik.support is torch.distributions.constraints.boolean
    dynamic = binarize == "dynamic" or (
        binarize == "auto" and needs_binary and not _is_binary(ds.train_x)
    )
    train, val, test = ds.train_x, ds.val_x, ds.test_x
    for x in (train, val, test):
        vae.check_input(x)
    if dynamic:
        if not bool(((train >= 0) & (train <= 1)).all()):
            raise ConfigError(
                "dynamic binarisation needs data in [0, 1], got values in "
                f"[{float(train.min()):.4g}, {float(train.max()):.4g}]"
            )
        # Evaluation data are binarised once, reproducibly, from their own generator.
        g = torch.Generator().manual_seed(seed + 1)
        val = torch.bernoulli(val.cpu(), generator=g).to(val.device)
        test = torch.bernoulli(test.cpu(), generator=g).to(test.device)
    else:
        lik.check_data(train, "training data")
    lik.check_data(val, "validation data")
    lik.check_data(test, "test data")
    return train, val, test, dynamic


C = TypeVar("C", bound=ConfigFile)


def resolve_config(
    cls: type[C],
    ctx: distributed.Context,
    config: Any,
    options: dict[str, Any],
    run_dir: Path | None,
    resume: bool,
) -> C:
    """The run's config: ``config`` (a ``cls``, a dict or None) updated by ``options``.

    With ``resume`` it is the saved ``run_dir/config.toml`` (read by rank 0 and sent to every
    rank), of which only ``epochs`` and ``device`` may be changed by ``options``.
    """
    if resume:
        if run_dir is None:
            raise ConfigError("resume=True needs the run directory `out`")
        extra = sorted(k for k in options if k not in ("epochs", "device"))
        if extra:
            raise ConfigError(
                f"resume uses the run's saved config; only `epochs` and `device` may change, "
                f"got {extra}"
            )

        def read_saved_config() -> dict[str, Any]:
            prepare_run_dir(run_dir, resume=True, overwrite=False)
            return cls.load(run_dir / "config.toml").to_dict()

        d = ctx.on_main(read_saved_config)
    else:
        d = config_as_dict(cls, config)
    d.update(options)
    return cls.from_dict(d)


def config_as_dict(cls: type[ConfigFile], config: Any) -> dict[str, Any]:
    """``config`` (a ``cls`` instance, a dict or None) as a new dict of its fields."""
    if isinstance(config, cls):
        return config.to_dict()
    if isinstance(config, dict):
        return dict(config)
    if config is None:
        return {}
    raise ConfigError(
        f"`config` must be a {cls.__name__}, a dict or None, got {type(config).__name__}"
    )


def _config_with_objects(cfg: FitConfig, prior: Any, likelihood: Any) -> FitConfig:
    d = cfg.to_dict()
    if prior is not None:
        d["prior"] = spec_of(prior, "prior")
    if likelihood is not None:
        d["likelihood"] = spec_of(likelihood, "likelihood")
    return FitConfig.from_dict(d)


def fit(
    config: FitConfig | dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    dataset: Dataset | None = None,
    prior: Any = None,
    likelihood: Any = None,
    figures: bool = True,
    on_epoch_end: Callable[[int, VAE, list[dict[str, float]]], None] | None = None,
    **options: Any,
) -> FitResult:
    r"""Train a VAE with SVI and evaluate it on the test split.

    Args:
        config: a :class:`FitConfig`, a dict of its fields, or None for the defaults;
            keyword ``options`` override single fields (``epochs=5``, ``prior="von-mises"``).
        out: run directory to write (config, history, checkpoints, metrics, figures);
            None trains in memory only.
        resume: continue the run in ``out`` from its last checkpoint (its saved config is used;
            ``epochs`` may be raised).
        overwrite: replace an existing run in ``out``.
        quiet: no progress bar (it is also off when stderr is not a terminal).
        dataset: an already-loaded :class:`~ppl_vae.data.Dataset` instead of ``config.data``.
        prior: a prior class or instance (instead of the ``prior`` name).
        likelihood: a likelihood class or instance (instead of the ``likelihood`` name).
        figures: write figures to ``out/figures``.
        on_epoch_end: called as ``on_epoch_end(epoch, vae, history)`` after each epoch's
            validation (``epoch`` counts from 1); e.g. to measure gradient statistics.

    Returns:
        A :class:`FitResult` with the trained model, per-epoch history and test metrics.

    Example:
        >>> result = fit(epochs=2, quiet=True)  # doctest: +SKIP
        >>> result.metrics["test_log_likelihood"] >= result.metrics["test_elbo"]  # doctest: +SKIP
        True
    """
    if isinstance(prior, str):
        options["prior"], prior = prior, None
    if isinstance(likelihood, str):
        options["likelihood"], likelihood = likelihood, None
    with pyro.settings.context(module_local_params=True):
        ctx = distributed.setup()
        try:
            return _fit(
                ctx,
                config,
                out,
                resume,
                overwrite,
                quiet,
                dataset,
                prior,
                likelihood,
                figures,
                on_epoch_end,
                options,
            )
        finally:
            distributed.teardown(ctx)


def _fit(
    ctx: distributed.Context,
    config: Any,
    out: str | Path | None,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    dataset: Dataset | None,
    prior: Any,
    likelihood: Any,
    figures: bool,
    on_epoch_end: Callable[[int, VAE, list[dict[str, float]]], None] | None,
    options: dict[str, Any],
) -> FitResult:
    run_dir = Path(out) if out is not None else None
    cfg = resolve_config(FitConfig, ctx, config, options, run_dir, resume)
    if not resume:
        cfg = _config_with_objects(cfg, prior, likelihood)

    device = ctx.device(cfg.device) if ctx.enabled else resolve_device(cfg.device)
    pyro.set_rng_seed(cfg.seed)
    if dataset is None:
        dataset = load_config_data(cfg)
    vae = build_config_vae(cfg, dataset, prior=prior, likelihood=likelihood)
    elbo = make_elbo(cfg.estimator, cfg.num_particles, cfg.vectorize_particles, max_plate_nesting=1)
    dataset = dataset.to(device)
    vae.to(device)
    train_x, val_x, test_x, dynamic = prepare_data(dataset, vae, cfg.binarize, cfg.seed)
    optimizer = make_adam(vae.parameters(), lr=cfg.lr)
    # Alone: the loss itself. Under torchrun: a DDP module whose forward computes it.
    step_loss = ctx.wrap(vae, build_loss(elbo, vae), device)
    shuffle = torch.Generator().manual_seed(cfg.seed)

    history: list[dict[str, float]] = []
    start_epoch = 0
    if run_dir is not None and not resume:

        def start_run() -> None:
            prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
            cfg.save(run_dir / "config.toml")

        ctx.on_main(start_run)
    if resume:
        assert run_dir is not None
        # Several processes: rank 0 reads the checkpoint on the CPU and hands it to every rank.
        where = "cpu" if ctx.enabled else device
        state = ctx.on_main(lambda: _open_resumed_run(run_dir, cfg, where))
        if state is not None:
            try:
                vae.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, KeyError, ValueError) as e:
                raise ConfigError(
                    f"checkpoint in {str(run_dir)!r} does not match the model its config "
                    f"builds: {ckpt.describe_load_error(e)}"
                ) from None
            ckpt.set_rng_state(state["rng"], shuffle)
            history = [dict(h) for h in state["history"]]
            start_epoch = int(state["epoch"])

    n = train_x.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    annealed = [m for m in vae.modules() if m is not vae and callable(getattr(m, "anneal", None))]
    bar = tqdm(
        total=total_steps,
        initial=start_epoch * steps_per_epoch,
        disable=quiet or not sys.stderr.isatty() or not ctx.is_main,
        desc="fit",
        unit="step",
        dynamic_ncols=True,
    )
    train_seconds = sum(h["seconds"] for h in history)
    vae.train()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            ctx.seed_epoch(cfg.seed, epoch)
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=shuffle).to(device)
            total = train_x.new_zeros(())
            for b in range(steps_per_epoch):
                step = epoch * steps_per_epoch + b
                progress = step / max(1, total_steps - 1)
                warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
                vae.kl_scale = cfg.beta * warm
                for m in annealed:
                    m.anneal(progress)
                x = train_x[ctx.shard(perm[b * cfg.batch_size : (b + 1) * cfg.batch_size])]
                if dynamic:
                    x = torch.bernoulli(x)
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss = step_loss(x)
                except ValueError as e:
                    # Distribution validation rejects NaN/inf parameters before the loss is
                    # formed: the same fault as a non-finite loss, reported the same way.
                    if "invalid values" not in str(e):
                        raise
                    raise TrainingError(
                        _nonfinite_message(
                            "non-finite distribution parameters", epoch, b, steps_per_epoch, run_dir
                        )
                        + f" ({str(e).splitlines()[0]})"
                    ) from None
                value = ctx.loss_value(loss.detach())
                if not bool(torch.isfinite(value)):
                    raise TrainingError(
                        _nonfinite_message(
                            f"non-finite loss ({float(value)})", epoch, b, steps_per_epoch, run_dir
                        )
                    )
                loss.backward()
                if cfg.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.clip_norm)
                optimizer.step()
                total = total + value
                bar.update(1)
            vae.kl_scale = 1.0
            val_elbo = ctx.on_main(functools.partial(mean_elbo, vae, val_x))
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            row = {
                "epoch": float(epoch + 1),
                "train_loss": float(total) / n,
                "val_elbo": val_elbo,
                "kl_scale": cfg.beta
                * (
                    min(1.0, (epoch + 1) * steps_per_epoch / warmup_steps)
                    if warmup_steps > 0
                    else 1.0
                ),
                "seconds": seconds,
            }
            history.append(row)
            bar.set_postfix(loss=f"{row['train_loss']:.2f}", val_elbo=f"{val_elbo:.2f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, vae, history)
            if run_dir is not None:
                # Rank 0 writes; the other ranks wait for it (on_main is a barrier).
                ctx.on_main(
                    functools.partial(
                        _write_epoch, run_dir, vae, optimizer, epoch + 1, history, shuffle, cfg
                    )
                )
    finally:
        bar.close()
    vae.kl_scale = 1.0
    ctx.dump(vae)

    kept: list[Scores] = []

    def evaluate_and_write() -> dict[str, Any]:
        metrics, scores = _test_metrics(
            vae, cfg, dataset, test_x, history, dynamic, device, train_seconds
        )
        if ctx.enabled:
            metrics["processes"] = ctx.world_size
        kept.append(scores)
        if run_dir is not None:
            write_metrics(run_dir, metrics)
            write_scores_csv(run_dir / "scores.csv", kept[0], dataset.test_y)
            if figures:
                from .figures import write_figures

                result = FitResult(vae, cfg, dataset, history, metrics, run_dir, kept[0])
                metrics["figures"] = [
                    p.name for p in write_figures(result, test_x, draws=cfg.figure_draws)
                ]
                write_metrics(run_dir, metrics)
        return metrics

    # Rank 0 scores the test set and writes; every rank returns its metrics.
    metrics = ctx.on_main(evaluate_and_write)
    return FitResult(vae, cfg, dataset, history, metrics, run_dir, kept[0] if kept else None)


def load_resume_state(
    run_dir: Path, epochs: int, map_location: Any, stacklevel: int
) -> dict[str, Any] | None:
    """The newest good checkpoint of a run being resumed, or None (with a warning) if it has none.

    Raises if ``epochs`` is below the epochs the checkpoint has done. ``stacklevel`` is that of
    the warning, counted from this function.
    """
    if not ckpt.has_checkpoint(run_dir):
        warnings.warn(
            f"no checkpoint in {str(run_dir)!r} yet (the run stopped in its first epoch); "
            "training starts again from epoch 0 with the run's saved config",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        return None
    state = ckpt.load_checkpoint(run_dir, map_location=map_location)
    done = int(state["epoch"])
    if epochs < done:
        raise ConfigError(
            f"`epochs` must be at least the {done} epochs this run has trained when "
            f"resuming, got {epochs}"
        )
    return state


def _open_resumed_run(run_dir: Path, cfg: FitConfig, map_location: Any) -> dict[str, Any] | None:
    """Rank 0's part of a resume: the newest good checkpoint (None: start again from epoch 0).

    Checks that ``epochs`` is not below what the run has done before anything in the directory
    changes; then clears leftover temporary files, brings ``history.csv`` up to the checkpoint
    and saves a raised ``epochs`` into ``config.toml``.
    """
    # warning: load_resume_state < _open_resumed_run < lambda < on_main < _fit < fit < caller
    state = load_resume_state(run_dir, cfg.epochs, map_location, stacklevel=7)
    ckpt.remove_temporaries(run_dir)
    if state is not None:
        history_csv = run_dir / "history.csv"
        text = history_text(state["history"])
        if not history_csv.is_file() or history_csv.read_text(encoding="utf-8") != text:
            write_history_csv(history_csv, state["history"])
    if cfg.epochs != FitConfig.load(run_dir / "config.toml").epochs:
        cfg.save(run_dir / "config.toml")
    return state


def _write_epoch(
    run_dir: Path,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, float]],
    shuffle: torch.Generator,
    cfg: FitConfig,
) -> None:
    """The end-of-epoch writes: the checkpoint, then ``history.csv``."""
    state = {
        "model": vae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "rng": ckpt.rng_state(shuffle),
        "config": cfg.to_dict(),
    }
    ckpt.save_checkpoint(run_dir, state)
    write_history_csv(run_dir / "history.csv", history)


def _test_metrics(
    vae: VAE,
    cfg: FitConfig,
    dataset: Dataset,
    test_x: torch.Tensor,
    history: list[dict[str, float]],
    dynamic: bool,
    device: torch.device,
    train_seconds: float,
) -> tuple[dict[str, Any], Scores]:
    """Test ELBO and log-likelihood with the run's summary, and the per-point scores."""
    scores = score(
        vae, test_x, num_samples=cfg.log_likelihood_samples, chunk_size=cfg.log_likelihood_chunk
    )
    summary = scores.summary()
    metrics: dict[str, Any] = {
        "test_elbo": summary["elbo"],
        "test_log_likelihood": summary["log_likelihood"],
        "test_log_likelihood_se": summary["log_likelihood_se"],
        "log_likelihood_samples": cfg.log_likelihood_samples,
        "units": "nats per data point",
        "epochs": cfg.epochs,
        "train_seconds": train_seconds,
        "final_val_elbo": history[-1]["val_elbo"] if history else float("nan"),
        "best_val_elbo": max(h["val_elbo"] for h in history) if history else float("nan"),
        "best_epoch": int(max(history, key=lambda h: h["val_elbo"])["epoch"]) if history else 0,
        "prior": cfg.prior,
        "likelihood": cfg.likelihood,
        "estimator": cfg.estimator,
        "latent_dim": cfg.latent_dim,
        "binarization": "dynamic"
        if dynamic
        else ("static" if cfg.binarize == "static" else "none"),
        "num_parameters": sum(p.numel() for p in vae.parameters()),
        "device": str(device),
        "data": dataset.describe(),
    }
    bpd = bits_per_dim(vae.likelihood, summary["log_likelihood"], dataset.num_levels)
    if bpd is not None:
        metrics["test_bits_per_dim"] = bpd
    prior_summary = vae.prior.summary(vae.codes(test_x))
    if prior_summary:
        metrics["prior_summary"] = prior_summary
    return metrics, scores


def _nonfinite_message(what: str, epoch: int, batch: int, steps: int, run_dir: Path | None) -> str:
    where = (
        f"the last good checkpoint (epoch {epoch}) is in {str(run_dir)!r}"
        if run_dir is not None and epoch > 0
        else "no checkpoint was written"
    )
    return (
        f"{what} at epoch {epoch + 1}, batch {batch + 1} of {steps}; {where}. "
        "Try a lower --lr or --clip-norm."
    )


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    write_text_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")


def history_text(history: list[dict[str, float]]) -> str:
    """The per-epoch history as CSV text (empty for no epochs)."""
    if not history:
        return ""
    cols = list(history[0])
    lines = [",".join(cols)]
    for h in history:
        lines.append(",".join(f"{h[c]:.6g}" if c != "epoch" else str(int(h[c])) for c in cols))
    return "\n".join(lines) + "\n"


def write_history_csv(path: Path, history: list[dict[str, float]]) -> None:
    if not history:
        return
    write_text_atomic(path, history_text(history))
