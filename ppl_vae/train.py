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
:mod:`ppl_vae.training.distributed` for the conventions (shards, loss scaling, seeds, rank 0's I/O).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import torch

from .components import build as build_component
from .components import recorded_options, spec_of
from .components import resolve as resolve_component
from .config import FitConfig
from .data import Dataset, load_data
from .inference.estimators import make_elbo
from .kinds.user import UserKind
from .kinds.vae import FitResult, VAEKind
from .models.errors import ConfigError
from .training import Callback, EpochFunction, Settings, Trainer, TrainingError, distributed
from .training import checkpoint as ckpt
from .training.diagnostics import LatentDiagnostics
from .training.rundir import (
    RUN_FILES,
    config_as_dict,
    load_resume_state,
    prepare_run_dir,
    resolve_config,
    write_metrics,
)
from .training.setup import initialize_from_data, prepare_data, resolve_device
from .training.trainer import history_text, write_history_csv
from .vae import VAE, build_prior_and_likelihood, build_vae

__all__ = [
    "RUN_FILES",
    "FitResult",
    "TrainingError",
    "build_config_vae",
    "config_as_dict",
    "fit",
    "load_config_data",
    "load_resume_state",
    "prepare_data",
    "prepare_run_dir",
    "resolve_config",
    "resolve_device",
    "write_history_csv",
    "write_metrics",
]


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
        seed=cfg.split_seed if seed is None else seed,
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
        encoder=cfg.encoder,
        decoder=cfg.decoder,
        encoder_args=cfg.encoder_args,
        decoder_args=cfg.decoder_args,
        guide_family=cfg.guide_family,
        guide_family_args=cfg.guide_family_args,
    )


#: FitConfig fields that describe the built-in VAE; a user's model defines its own.
VAE_FIELDS = (
    "prior",
    "prior_args",
    "likelihood",
    "likelihood_args",
    "latent_dim",
    "hidden_dims",
    "network",
    "encoder",
    "encoder_args",
    "decoder",
    "decoder_args",
    "guide_family",
    "guide_family_args",
)


#: What the engine offers a model/guide pair's constructor, by parameter name, and the config
#: fields each offer is built from (a pair that takes ``prior`` gets ``--prior`` built with
#: ``--prior-arg`` and ``--latent-dim``; one that takes nothing gets nothing).
OFFERED: dict[str, tuple[str, ...]] = {
    "prior": ("prior", "prior_args", "latent_dim"),
    "likelihood": ("likelihood", "likelihood_args"),
    "latent_dim": ("latent_dim",),
    "hidden_dims": ("hidden_dims",),
}


def _model_class(spec: Any) -> type:
    if isinstance(spec, torch.nn.Module):
        return type(spec)
    return resolve_component(spec, "model")


def offered_to(spec: Any) -> set[str]:
    """The components of :data:`OFFERED` that the model class's constructor asks for."""
    if isinstance(spec, torch.nn.Module):
        return set()  # an instance is built already
    params = inspect.signature(_model_class(spec).__init__).parameters
    return {name for name in OFFERED if name in params}


def build_config_model(
    cfg: FitConfig, dataset: Dataset, model: Any = None, prior: Any = None, likelihood: Any = None
) -> torch.nn.Module:
    """A model/guide pair from ``cfg.model`` (or ``model``, a class or an instance), built with
    ``cfg.model_args`` plus, for the constructor parameters of those names, ``data_shape`` and
    the components of :data:`OFFERED` (``prior`` and ``likelihood`` built and checked as the
    VAE's are; ``prior``/``likelihood`` here may be classes or instances replacing the names)."""
    spec = model if model is not None else cfg.model
    args = {} if isinstance(model, torch.nn.Module) else dict(cfg.model_args)
    offered = offered_to(spec)
    reserved = sorted(set(args) & (offered | {"data_shape"}))
    if reserved:
        raise ConfigError(
            f"model option(s) {reserved} are set by the engine (from the data and "
            "--prior/--likelihood/--latent-dim/--hidden-dims), not by --model-arg"
        )
    context: dict[str, Any] = {"data_shape": dataset.data_shape}
    if offered & {"prior", "likelihood"}:
        p, lik = build_prior_and_likelihood(
            dataset.data_shape,
            prior if prior is not None else cfg.prior,
            likelihood if likelihood is not None else cfg.likelihood,
            cfg.latent_dim,
            None if isinstance(prior, torch.nn.Module) else cfg.prior_args,
            None if isinstance(likelihood, torch.nn.Module) else cfg.likelihood_args,
            dataset.num_levels,
        )
        context.update({"prior": p, "likelihood": lik})
    context.update({"latent_dim": cfg.latent_dim, "hidden_dims": tuple(cfg.hidden_dims)})
    context = {k: v for k, v in context.items() if k == "data_shape" or k in offered}
    return build_component(spec, "model", context, args)


def _check_user_config(cfg: FitConfig, prior: Any, likelihood: Any, model: Any = None) -> None:
    """With ``model`` set, options of the built-in VAE that the pair does not ask for would be
    silently unused: refuse them."""
    default = FitConfig()
    accepted = {
        f for name in offered_to(model if model is not None else cfg.model) for f in OFFERED[name]
    }
    given = [f for f in VAE_FIELDS if f not in accepted and getattr(cfg, f) != getattr(default, f)]
    given += [
        n
        for n, v in (("prior", prior), ("likelihood", likelihood))
        if v is not None and n not in accepted
    ]
    if given:
        asks = sorted(offered_to(model if model is not None else cfg.model))
        raise ConfigError(
            f"`model` {cfg.model!r} is a model/guide pair of its own, so the built-in VAE's "
            f"options {sorted(set(given))} do not apply (its constructor asks for "
            f"{asks or 'none of prior, likelihood, latent_dim, hidden_dims'}); pass its options "
            "as model_args (--model-arg KEY=VALUE)"
        )


def _config_with_model(cfg: FitConfig, model: Any, strict: bool) -> FitConfig:
    """Record a model class or instance given to :func:`fit` (an instance: its options too)."""
    d = cfg.to_dict()
    d["model"] = spec_of(model, "model")
    if isinstance(model, torch.nn.Module):
        if cfg.model_args:
            raise ConfigError("`model_args` given with a model instance")
        try:
            d["model_args"] = recorded_options(model, "model", ("data_shape",))
        except ConfigError:
            if strict:
                raise
    return FitConfig.from_dict(d)


def _config_with_objects(cfg: FitConfig, prior: Any, likelihood: Any, strict: bool) -> FitConfig:
    """Record the component classes and instances given to :func:`fit` in the config.

    An instance's constructor options become ``prior_args``/``likelihood_args`` (its
    ``latent_dim`` the config's), so that the run directory rebuilds it exactly. Options that
    cannot be recorded are an error when the run writes a directory (``strict``); in memory they
    are left out of the config.
    """
    d = cfg.to_dict()
    for kind, obj, context in (
        ("prior", prior, ("latent_dim",)),
        ("likelihood", likelihood, ("data_shape", "num_levels")),
    ):
        if obj is None:
            continue
        d[kind] = spec_of(obj, kind)
        if isinstance(obj, torch.nn.Module):
            if kind == "prior":
                d["latent_dim"] = int(obj.latent_dim)
            try:
                d[f"{kind}_args"] = recorded_options(obj, kind, context)
            except ConfigError:
                if strict:
                    raise
                d[f"{kind}_args"] = {}
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
    callbacks: list[Callback] | None = None,
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
        callbacks: :class:`~ppl_vae.training.Callback` instances (trackers, probes), called
            after ``on_epoch_end``.

    Returns:
        A :class:`FitResult` with the trained model, per-epoch history and test metrics.

    Example:
        >>> result = fit(epochs=2, quiet=True)  # doctest: +SKIP
        >>> result.metrics["test_log_likelihood"] >= result.metrics["test_elbo"]  # doctest: +SKIP
        True
    """
    model = options.get("model")
    model_obj = None if model is None or isinstance(model, str) else options.pop("model")
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
                callbacks,
                model_obj,
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
    callbacks: list[Callback] | None,
    model_obj: Any,
    options: dict[str, Any],
) -> FitResult:
    run_dir = Path(out) if out is not None else None
    cfg = resolve_config(FitConfig, ctx, config, options, run_dir, resume)
    if not resume:
        cfg = _config_with_objects(cfg, prior, likelihood, strict=run_dir is not None)
        if model_obj is not None:
            cfg = _config_with_model(cfg, model_obj, strict=run_dir is not None)
    user = cfg.kind == "user"
    if user:
        _check_user_config(cfg, prior, likelihood, model_obj)

    device = ctx.device(cfg.device) if ctx.enabled else resolve_device(cfg.device)
    pyro.set_rng_seed(cfg.seed)
    if dataset is None:
        dataset = load_config_data(cfg)
    if user:
        vae = build_config_model(cfg, dataset, model_obj, prior, likelihood)
    else:
        vae = build_config_vae(cfg, dataset, prior=prior, likelihood=likelihood)
    nesting = int(getattr(vae, "max_plate_nesting", 1))
    elbo = make_elbo(
        cfg.estimator, cfg.num_particles, cfg.vectorize_particles, max_plate_nesting=nesting
    )
    dataset = dataset.to(device)
    vae.to(device)
    train_x, val_x, test_x, dynamic = prepare_data(dataset, vae, cfg.binarize, cfg.split_seed)
    if not resume:
        initialize_from_data(vae, train_x)
    make_kind = UserKind if user else VAEKind
    kind = make_kind(vae, elbo, cfg, dataset, (train_x, val_x, test_x), dynamic, device)
    kind.progress = not quiet  # the test log p(x) and the figures: bars on a terminal
    hooks = list(callbacks or [])
    if on_epoch_end is not None:
        hooks.insert(0, EpochFunction(on_epoch_end))
    if cfg.latent_diagnostics:
        hooks.insert(0, LatentDiagnostics())
    trainer = Trainer(
        kind,
        Settings(
            epochs=cfg.epochs,
            lr=cfg.lr,
            beta=cfg.beta,
            warmup_epochs=cfg.warmup_epochs,
            beta_schedule=cfg.beta_schedule,
            beta_schedule_args=cfg.beta_schedule_args,
            patience=cfg.patience,
            clip_norm=cfg.clip_norm,
            seed=cfg.seed,
            lr_schedule=cfg.lr_schedule,
            lr_schedule_args=cfg.lr_schedule_args,
        ),
        ctx=ctx,
        device=device,
        run_dir=run_dir,
        config=cfg.to_dict(),
        callbacks=hooks,
        quiet=quiet,
    )
    if run_dir is not None and not resume:

        def start_run() -> None:
            prepare_run_dir(run_dir, resume=False, overwrite=overwrite)
            cfg.save(run_dir / "config.toml")

        ctx.on_main(start_run)
    if resume:
        assert run_dir is not None
        # Several processes: rank 0 reads the checkpoint on the CPU and hands it to every rank.
        where = "cpu" if ctx.enabled else device
        # warning: load_resume_state < lambda < on_main < _fit < fit < caller
        state = ctx.on_main(lambda: load_resume_state(run_dir, cfg.epochs, where, stacklevel=6))
        if state is not None:
            trainer.load_state(state)
        # Only once the checkpoint is known to fit the model: an error never changes the run.
        ctx.on_main(lambda: _update_resumed_run(run_dir, cfg, state))
    metrics = trainer.run(figures)
    return FitResult(vae, cfg, dataset, trainer.history, metrics, run_dir, kind.scores)


def _update_resumed_run(run_dir: Path, cfg: FitConfig, state: dict[str, Any] | None) -> None:
    """Rank 0's writes of a resume, after the checkpoint was loaded into the model: clear
    leftover temporary files, bring ``history.csv`` up to the checkpoint and save a raised
    ``epochs`` into ``config.toml``."""
    ckpt.remove_temporaries(run_dir)
    if state is not None:
        history_csv = run_dir / "history.csv"
        text = history_text(state["history"])
        if not history_csv.is_file() or history_csv.read_text(encoding="utf-8") != text:
            write_history_csv(history_csv, state["history"])
    if cfg.epochs != FitConfig.load(run_dir / "config.toml").epochs:
        cfg.save(run_dir / "config.toml")
