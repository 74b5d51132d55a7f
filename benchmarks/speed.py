r"""Speed of ``fit()`` against a hand-written PyTorch VAE and Pyro's DataLoader + SVI pattern.

Every variant trains the same networks (an MLP encoder ``D -> 400 -> 2 x 20`` and decoder
``20 -> 400 -> D``, Bernoulli likelihood, standard normal prior, Adam at lr 1e-3, batch 128) on
the same binary data, in one process, interleaved round by round (A, B, C, ..., A, B, C, ...;
the order rotates every round), so that the load of a shared machine hits all of them alike:

``hand, fused Adam``
    A hand-written PyTorch VAE: the same layer sizes (checked against the engine's modules),
    closed-form Gaussian KL, ``binary_cross_entropy_with_logits(reduction="sum")``; batches by
    shuffled index from a tensor on the device, like ``fit()``; no per-step host sync. Its
    optimiser comes from :func:`ppl_vae.training.optim.make_adam`, the function ``fit()`` calls
    (``torch.optim.Adam(..., fused=True)`` where the kernel exists), so the two run the same
    optimiser implementation. **The primary ratios are to this variant**: they compare the
    engine with a hand-written loop, not one optimiser kernel with another.
``hand, default Adam``
    The same loop with ``torch.optim.Adam`` at its defaults (the per-tensor "for-loop" update
    on the CPU), as most hand-written VAEs are. Kept as a secondary, separately labelled ratio:
    against it ``fit()`` also gets the credit of the fused kernel, which is not the engine's
    doing.
``fit:trace``, ``fit:meanfield``
    :func:`ppl_vae.fit` itself, with ``estimator="trace"`` / ``"meanfield"``. Its epoch time is
    taken between consecutive ``on_epoch_end`` calls; its steps per second exclude the
    per-epoch validation pass (timed by wrapping ``ppl_vae.train.mean_elbo``), its seconds per
    epoch include it.
``fit:trace, Pyro ELBO``
    The same ``fit()`` with the fast path switched off (``build_loss(..., fast=False)``):
    every step is ``Trace_ELBO.differentiable_loss`` on the model/guide pair.
``pyro:DataLoader+SVI``
    The pattern of Pyro's examples (``examples/vae/vae.py``): ``pyro.module`` registrations in
    the global parameter store, a ``torch.utils.data.DataLoader`` over a ``TensorDataset``
    (``shuffle=True``, ``num_workers=0``), batches moved to the device in the loop,
    ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step(x)``.
``hand, fused Adam, torch.compile`` (``--compile``)
    The hand-written VAE with its loss (networks, sampling, BCE, KL; forward and backward)
    compiled by ``torch.compile``, with ``make_adam`` like the primary reference (so its primary
    ratio is the compiler's effect); compiled afresh in each run, in its dropped first epoch.
``pyro:DataLoader+SVI, Jit...`` (``--jit``)
    The same with ``JitTrace_ELBO``, ``JitTraceMeanField_ELBO``, and the latter with the bug
    that recompiles it every step fixed (:class:`FixedJitTraceMeanField_ELBO`).

The table's "Adam" column names each variant's optimiser implementation (``pyro.optim.Adam``
wraps ``torch.optim.Adam`` at its defaults, so the DataLoader + SVI rows run the default one).

The first epoch of every run is dropped (warm-up; for ``fit()`` it also holds the one validated
Pyro step that switches the fast path on); the tables give medians over the remaining epochs of
all rounds. Ratios are of medians. "CPU" columns use the process's CPU time instead of wall
time: on a machine shared with other jobs they move less with the load. "Paired" columns
(:func:`paired_ratios`) take the ratio within each round (of that round's mean) and report the
median over rounds: on a machine whose speed drifts during the run (seen here: the
hand-written VAE's step at 784 5-15 % faster in a run's last rounds than in its first), the
ratio of all-round medians depends on where in the rotation each variant met the slow phase,
the paired one much less.

Data: "784" is MNIST-sized random binary data (Bernoulli(0.13) pixels, the mean of binarised
MNIST; speed does not depend on the values), "64" is scikit-learn's digits, binarised once
(``load_data("digits", binarize="static")``, 1,294 training points).

Scale: seconds per epoch of ``fit(estimator="trace")`` at 1x, 2x and 4x the data (interleaved),
and peak memory, each measured in a fresh subprocess: per epoch of ``fit()``, and in
:func:`ppl_vae.score` as the number K of importance samples grows, chunked (100 at a time) and,
for contrast, unchunked. On CPU "peak memory" is the growth of the process's peak resident set
size (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its size
before the measured call: it counts every allocation that touched memory (torch's CPU tensors
come from ``malloc``), which ``tracemalloc`` would not see. On CUDA it is
``torch.cuda.max_memory_allocated()`` (reset before each measurement).

Run: ``OMP_NUM_THREADS=1 python benchmarks/speed.py``; the README's speed table is from
``--skip-scale`` runs with and without ``--quick`` (a short run: 2 rounds, fewer epochs);
``--device cuda`` on a GPU, ``--jit`` for the JIT variants, ``--compile`` for the compiled
hand-written loss, ``--json FILE`` to keep the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ppl_vae.kinds.batched as batched_module  # the one-batch kinds: their validation
import ppl_vae.kinds.vae as train_module  # the VAE kind: its step loss
from ppl_vae import Dataset, build_vae, fit, load_data, score
from ppl_vae.cli import Parser, run_command
from ppl_vae.inference.fastpath import build_loss
from ppl_vae.training.optim import make_adam
from ppl_vae.training.setup import resolve_device

LATENT = 20
HIDDEN = 400
BATCH = 128
LR = 1e-3
MNIST_DENSITY = 0.13


# -- data ------------------------------------------------------------------------------------
def mnist_sized(num_train: int, seed: int = 0) -> Dataset:
    """Random binary data of MNIST's size per point (784), 128 validation and test points."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> torch.Tensor:
        return torch.bernoulli(torch.full((n, 784), MNIST_DENSITY), generator=g)

    return Dataset(
        name="random-binary-784",
        train_x=draw(num_train),
        val_x=draw(BATCH),
        test_x=draw(BATCH),
        train_y=None,
        val_y=None,
        test_y=None,
        data_shape=(784,),
        image_shape=(1, 28, 28),
        num_classes=None,
        num_levels=2,
        binarized="static",
        source=f"benchmarks/speed.py: Bernoulli({MNIST_DENSITY}) pixels",
        seed=seed,
    )


def digits() -> Dataset:
    return load_data("digits", binarize="static", seed=0)


# -- timing ------------------------------------------------------------------------------------
@dataclass
class Epoch:
    """One epoch: wall and CPU seconds, the part of them spent in validation, steps, round."""

    wall: float
    cpu: float
    steps: int
    val_wall: float = 0.0
    val_cpu: float = 0.0
    round: int = 0


@dataclass
class Runs:
    """Every kept epoch of one variant on one data set."""

    epochs: list[Epoch] = field(default_factory=list)

    def steps_per_second(self, cpu: bool = False) -> float:
        """Median over epochs of training steps per second (validation excluded)."""
        return statistics.median(
            e.steps / ((e.cpu - e.val_cpu) if cpu else (e.wall - e.val_wall)) for e in self.epochs
        )

    def seconds_per_epoch(self, cpu: bool = False) -> float:
        """Median over epochs of whole-epoch seconds (validation included)."""
        return statistics.median(e.cpu if cpu else e.wall for e in self.epochs)

    def by_round(self) -> dict[int, tuple[float, float]]:
        """Per round: (mean training steps per second, mean whole-epoch seconds)."""
        rounds: dict[int, list[Epoch]] = {}
        for e in self.epochs:
            rounds.setdefault(e.round, []).append(e)
        return {
            r: (
                statistics.mean(e.steps / (e.wall - e.val_wall) for e in eps),
                statistics.mean(e.wall for e in eps),
            )
            for r, eps in rounds.items()
        }


def paired_ratios(runs: Runs, hand: Runs, svi: Runs) -> tuple[float, float]:
    """Medians over rounds of (steps/s ÷ hand's, DataLoader+SVI's s/epoch ÷ this) in each round.

    A round runs every variant once, back to back, so its ratios compare runs that were close in
    time; their median over rounds resists a machine whose speed drifts between rounds, which the
    ratio of all-round medians does not.
    """
    mine, h, v = runs.by_round(), hand.by_round(), svi.by_round()
    common = sorted(set(mine) & set(h) & set(v))
    steps = statistics.median(mine[r][0] / h[r][0] for r in common)
    epoch = statistics.median(v[r][1] / mine[r][1] for r in common)
    return steps, epoch


class Clock:
    """Wall and process CPU time, synchronising a CUDA device first."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self) -> tuple[float, float]:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()


# -- (a) the hand-written VAE ------------------------------------------------------------------
class HandVAE(nn.Module):
    r"""A VAE written directly in PyTorch, with the engine's layer sizes.

    .. math:: -\mathcal{L} = \mathrm{BCE}(\mathrm{dec}(z), x)
        - \tfrac12 \textstyle\sum (1 + \log\sigma^2 - \mu^2 - \sigma^2),
        \quad z = \mu + \sigma\varepsilon
    """

    def __init__(self, data_dim: int) -> None:
        super().__init__()
        self.enc = nn.Linear(data_dim, HIDDEN)
        self.head = nn.Linear(HIDDEN, 2 * LATENT)
        self.dec1 = nn.Linear(LATENT, HIDDEN)
        self.dec2 = nn.Linear(HIDDEN, data_dim)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        loc, log_var = self.head(F.relu(self.enc(x))).chunk(2, dim=-1)
        std = torch.exp(0.5 * log_var)
        z = loc + std * torch.randn_like(std)
        logits = self.dec2(F.relu(self.dec1(z)))
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + log_var - loc.pow(2) - log_var.exp())
        return rec + kl


def linear_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return sorted(tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Linear))


def check_same_networks(data_dim: int) -> None:
    """The hand-written and Pyro-pattern VAEs have exactly the engine's linear layers."""
    engine = build_vae((data_dim,), latent_dim=LATENT, hidden_dims=(HIDDEN,), network="mlp")
    ours = linear_shapes(engine.encoder) + linear_shapes(engine.decoder)
    for other in (HandVAE(data_dim), PyroPatternVAE(data_dim)):
        if sorted(ours) != linear_shapes(other):
            raise AssertionError(f"networks differ: engine {sorted(ours)}, {linear_shapes(other)}")


def hand_optimizer(model: nn.Module, adam: str) -> torch.optim.Adam:
    """The hand-written loop's Adam: ``"fit"``, :func:`make_adam` (what ``fit()`` calls);
    ``"default"``, ``torch.optim.Adam`` at its defaults."""
    if adam == "fit":
        return make_adam(model.parameters(), lr=LR)
    if adam == "default":
        return torch.optim.Adam(model.parameters(), lr=LR)
    raise ValueError(f"`adam` must be 'fit' or 'default', got {adam!r}")


def fit_adam_is_fused(device: torch.device) -> bool:
    """Whether :func:`make_adam` (``fit()``'s optimiser) gets the fused kernel here."""
    probe = nn.Linear(2, 2).to(device)
    return bool(make_adam(probe.parameters(), lr=LR).param_groups[0].get("fused"))


def run_hand(
    ds: Dataset,
    epochs: int,
    device: torch.device,
    seed: int = 0,
    adam: str = "fit",
    compiled: bool = False,
) -> list[Epoch]:
    """The hand-written loop, with the optimiser :func:`hand_optimizer` gives for ``adam``."""
    clock = Clock(device)
    torch.manual_seed(seed)
    x = ds.train_x.to(device)
    model = HandVAE(x.shape[1]).to(device)
    optimizer = hand_optimizer(model, adam)
    loss_fn = model.loss
    if compiled:
        # A fresh compilation per run: Dynamo guards on the model object, and without a reset
        # later rounds would hit its recompilation limit and silently run eagerly.
        torch._dynamo.reset()
        loss_fn = torch.compile(model.loss)
    shuffle = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    steps = math.ceil(n / BATCH)
    out = []
    for _ in range(epochs):
        wall0, cpu0 = clock()
        perm = torch.randperm(n, generator=shuffle).to(device)
        total = x.new_zeros(())
        for b in range(steps):
            xb = x[perm[b * BATCH : (b + 1) * BATCH]]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(xb)
            loss.backward()
            optimizer.step()
            total = total + loss.detach()
        wall1, cpu1 = clock()
        out.append(Epoch(wall1 - wall0, cpu1 - cpu0, steps))
    return out


# -- (b) Pyro's example pattern: DataLoader + SVI ---------------------------------------------
class PyroPatternVAE(nn.Module):
    """The same networks, as a model/guide pair in the style of Pyro's ``examples/vae``."""

    def __init__(self, data_dim: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(
            {"fc": nn.Linear(data_dim, HIDDEN), "head": nn.Linear(HIDDEN, 2 * LATENT)}
        )
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, data_dim)
        )

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros((x.shape[0], LATENT))
            z_scale = x.new_ones((x.shape[0], LATENT))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            h = F.relu(self.encoder["fc"](x))
            loc, log_scale = self.encoder["head"](h).chunk(2, dim=-1)
            pyro.sample("latent", dist.Normal(loc, log_scale.exp()).to_event(1))


class FixedJitTraceMeanField_ELBO(JitTraceMeanField_ELBO):
    """``JitTraceMeanField_ELBO`` with the compiled loss actually reused.

    The cause of its slowness (pyro-ppl 1.9.2, ``pyro/infer/trace_mean_field_elbo.py``):
    ``differentiable_loss`` tests ``getattr(self, "_loss_and_surrogate_loss", None) is None``
    but stores the compiled closure as ``self._differentiable_loss``, so the test never fails
    and every step builds a new ``pyro.ops.jit.trace`` closure and runs ``torch.jit.trace``
    again (counted: 105 traces in 105 steps; after this fix, 1). This subclass reuses the stored
    closure, with the same keyword arguments Pyro's method adds.
    """

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> Any:
        compiled = getattr(self, "_differentiable_loss", None)
        if compiled is None:
            return super().differentiable_loss(model, guide, *args, **kwargs)
        kwargs["_pyro_model_id"] = id(model)
        kwargs["_pyro_guide_id"] = id(guide)
        return compiled(*args, **kwargs)


def run_svi(
    ds: Dataset,
    epochs: int,
    device: torch.device,
    seed: int = 0,
    loss: Callable[[], Any] = Trace_ELBO,
) -> list[Epoch]:
    clock = Clock(device)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = PyroPatternVAE(ds.train_x.shape[1]).to(device)
    loader = DataLoader(TensorDataset(ds.train_x.cpu()), batch_size=BATCH, shuffle=True)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": LR}), loss=loss())
    out = []
    with pyro.settings.context(module_local_params=False):
        for _ in range(epochs):
            wall0, cpu0 = clock()
            epoch_loss = 0.0
            for (xb,) in loader:
                epoch_loss += svi.step(xb.to(device))
            wall1, cpu1 = clock()
            out.append(Epoch(wall1 - wall0, cpu1 - cpu0, len(loader)))
    pyro.clear_param_store()
    return out


# -- (c) fit() -------------------------------------------------------------------------------
@contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def fit_options(device: torch.device) -> dict[str, Any]:
    return dict(
        latent_dim=LATENT,
        hidden_dims=[HIDDEN],
        network="mlp",
        batch_size=BATCH,
        lr=LR,
        log_likelihood_samples=1,
        log_likelihood_chunk=1,
        quiet=True,
        figures=False,
        device=device.type,
        seed=0,
        # The per-epoch latent diagnostics (an extra pass over the validation split, like the
        # validation ELBO) are not part of a training step: off here, so steps/s compares steps.
        latent_diagnostics=False,
    )


def run_fit(
    ds: Dataset, epochs: int, device: torch.device, estimator: str, fast: bool = True
) -> list[Epoch]:
    """``fit()``; epochs timed between ``on_epoch_end`` calls, validation timed separately."""
    clock = Clock(device)
    stamps: list[tuple[float, float]] = []
    validation: list[tuple[float, float]] = []
    mean_elbo = batched_module.mean_elbo

    def timed_mean_elbo(*args: Any, **kwargs: Any) -> float:
        wall0, cpu0 = clock()
        value = mean_elbo(*args, **kwargs)
        wall1, cpu1 = clock()
        validation.append((wall1 - wall0, cpu1 - cpu0))
        return value

    def on_epoch_end(epoch: int, vae: Any, history: list) -> None:
        stamps.append(clock())

    losses: list[Any] = []

    def loss_builder(elbo: Any, vae: Any) -> Any:
        losses.append(build_loss(elbo, vae, fast=fast))
        return losses[-1]

    with (
        patched(batched_module, "mean_elbo", timed_mean_elbo),
        patched(train_module, "build_loss", loss_builder),
    ):
        result = fit(
            dataset=ds,
            estimator=estimator,
            epochs=epochs,
            on_epoch_end=on_epoch_end,
            **fit_options(device),
        )
    steps = math.ceil(ds.train_x.shape[0] / BATCH)
    out = []
    for k in range(1, len(stamps)):
        (w0, c0), (w1, c1) = stamps[k - 1], stamps[k]
        vw, vc = validation[k]
        out.append(Epoch(w1 - w0, c1 - c0, steps, vw, vc))
    if fast and not getattr(losses[0], "fast", False):
        raise AssertionError(f"fit(estimator={estimator!r}) did not take the fast path")
    del result
    return out


# -- the comparison ---------------------------------------------------------------------------
#: The primary reference: the hand-written loop with ``fit()``'s optimiser (:func:`make_adam`).
REFERENCE = "hand, fused Adam"
#: The secondary reference: the same loop with ``torch.optim.Adam`` at its defaults.
DEFAULT_ADAM_REFERENCE = "hand, default Adam"

VARIANTS: dict[str, Callable[[Dataset, int, torch.device], list[Epoch]]] = {
    REFERENCE: partial(run_hand, adam="fit"),
    DEFAULT_ADAM_REFERENCE: partial(run_hand, adam="default"),
    "fit:trace": partial(run_fit, estimator="trace"),
    "fit:meanfield": partial(run_fit, estimator="meanfield"),
    "fit:trace, Pyro ELBO": partial(run_fit, estimator="trace", fast=False),
    "pyro:DataLoader+SVI": run_svi,
}
#: With ``--jit``: the same pattern with Pyro's JIT-compiled ELBOs (global parameter store; under
#: the engine's ``module_local_params`` ``JitTrace_ELBO`` fails: "Cannot insert a Tensor that
#: requires grad as a constant").
JIT_VARIANTS: dict[str, Callable[[Dataset, int, torch.device], list[Epoch]]] = {
    "pyro:DataLoader+SVI, JitTrace_ELBO": partial(
        run_svi, loss=partial(JitTrace_ELBO, ignore_jit_warnings=True)
    ),
    "pyro:DataLoader+SVI, JitTraceMeanField_ELBO": partial(
        run_svi, loss=partial(JitTraceMeanField_ELBO, ignore_jit_warnings=True)
    ),
    "pyro:DataLoader+SVI, JitTraceMeanField_ELBO fixed": partial(
        run_svi, loss=partial(FixedJitTraceMeanField_ELBO, ignore_jit_warnings=True)
    ),
}


#: With ``--compile``: the hand-written VAE's loss under ``torch.compile`` (``make_adam``, so its
#: ratio to :data:`REFERENCE` is the compiler's effect; compilation falls in the dropped first
#: epoch).
COMPILE_VARIANTS: dict[str, Callable[[Dataset, int, torch.device], list[Epoch]]] = {
    "hand, fused Adam, torch.compile": partial(run_hand, adam="fit", compiled=True),
}


def adam_of(name: str, fit_fused: bool) -> str:
    """The optimiser implementation variant ``name`` runs: ``fused`` or ``default``."""
    uses_make_adam = name.startswith("fit:") or name.startswith(REFERENCE)
    return "fused" if uses_make_adam and fit_fused else "default"


def compare(
    ds: Dataset,
    epochs: int,
    rounds: int,
    device: torch.device,
    jit: bool = False,
    compiled: bool = False,
) -> dict[str, Runs]:
    """Every variant, ``epochs`` epochs per run, ``rounds`` interleaved rounds."""
    variants = {
        **VARIANTS,
        **(JIT_VARIANTS if jit else {}),
        **(COMPILE_VARIANTS if compiled else {}),
    }
    runs = {name: Runs() for name in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            epochs_run = variants[name](ds, epochs, device)
            if not name.startswith("fit:"):
                epochs_run = epochs_run[1:]  # fit() runs have no start stamp for epoch 1
            for e in epochs_run:
                e.round = r
            runs[name].epochs.extend(epochs_run)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return runs


def speed_table(title: str, runs: dict[str, Runs], fit_fused: bool = True) -> str:
    """One row per variant. The primary ratios (steps/s, wall, CPU and paired) are to
    :data:`REFERENCE`, the hand-written loop with ``fit()``'s optimiser implementation; the ratio
    to :data:`DEFAULT_ADAM_REFERENCE` is a secondary, separately labelled column."""
    hand = runs[REFERENCE]
    default = runs[DEFAULT_ADAM_REFERENCE]
    svi = runs["pyro:DataLoader+SVI"]
    lines = [
        f"**{title}**",
        "",
        f"| variant | Adam | steps/s | ÷ {REFERENCE} | ÷ {REFERENCE} (CPU) "
        f"| ÷ {REFERENCE}, paired | secondary: ÷ {DEFAULT_ADAM_REFERENCE} (paired) "
        "| s/epoch | DataLoader+SVI s/epoch ÷ this | the same, paired |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        sps = r.steps_per_second()
        ratio = sps / hand.steps_per_second()
        ratio_cpu = r.steps_per_second(cpu=True) / hand.steps_per_second(cpu=True)
        spe = r.seconds_per_epoch()
        vs_svi = svi.seconds_per_epoch() / spe
        paired, paired_svi = paired_ratios(r, hand, svi)
        vs_default = sps / default.steps_per_second()
        paired_default, _ = paired_ratios(r, default, svi)
        lines.append(
            f"| {name} | {adam_of(name, fit_fused)} | {sps:.1f} | {ratio:.2f} | {ratio_cpu:.2f} "
            f"| {paired:.2f} | {vs_default:.2f} ({paired_default:.2f}) | {spe:.3f} "
            f"| {vs_svi:.2f} | {paired_svi:.2f} |"
        )
    return "\n".join(lines)


# -- scale: time ------------------------------------------------------------------------------
def scale_time(base_steps: int, rounds: int, device: torch.device) -> str:
    sizes = (1, 2, 4)
    data = {k: mnist_sized(k * base_steps * BATCH) for k in sizes}
    per: dict[int, list[Epoch]] = {k: [] for k in sizes}
    for r in range(rounds):
        order = sizes[r % 3 :] + sizes[: r % 3]
        for k in order:
            per[k].extend(run_fit(data[k], 2, device, "trace"))
    lines = [
        "**fit(estimator='trace') seconds per epoch vs data size (784 dims)**",
        "",
        "| data | points | s/epoch | µs per point | relative to 1x per point |",
        "|---|---:|---:|---:|---:|",
    ]
    base = None
    for k in sizes:
        n = data[k].train_x.shape[0]
        spe = statistics.median(e.wall for e in per[k])
        us = spe / n * 1e6
        base = base or us
        lines.append(f"| {k}x | {n} | {spe:.3f} | {us:.1f} | {us / base:.2f} |")
    return "\n".join(lines)


# -- scale: memory (children) -----------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


class PeakMemory:
    """Peak memory (MiB) since :meth:`reset`: the CUDA allocator's, or the process's RSS."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start = 0.0

    def current(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / 2**20
        return _status_kib("VmRSS") / 2**10

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM (peak RSS) to the current RSS
        self.start = self.current()

    def peak(self) -> float:
        """Absolute peak since the last reset."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kib("VmHWM") / 2**10


def child(args: argparse.Namespace) -> None:
    """Run one memory measurement and print it as JSON (run in a fresh process)."""
    device = torch.device(args.device)
    meter = PeakMemory(device)
    if args.child == "epochs":
        ds = mnist_sized(args.points)
        peaks, ends = [], []

        def on_epoch_end(epoch: int, vae: Any, history: list) -> None:
            peaks.append(meter.peak())
            ends.append(meter.current())
            meter.reset()

        meter.reset()
        before = meter.start
        fit(dataset=ds, epochs=args.epochs, on_epoch_end=on_epoch_end, **fit_options(device))
        print(json.dumps({"before": before, "peaks": peaks, "ends": ends}))
    else:
        torch.manual_seed(0)
        vae = build_vae((784,), latent_dim=LATENT, hidden_dims=(HIDDEN,), network="mlp").to(device)
        x = torch.bernoulli(torch.full((args.points, 784), MNIST_DENSITY)).to(device)
        score(vae, x, num_samples=2, chunk_size=2, batch_size=args.points)  # warm up
        meter.reset()
        t0 = time.perf_counter()
        score(vae, x, num_samples=args.k, chunk_size=args.chunk, batch_size=args.points)
        growth = meter.peak() - meter.start
        print(json.dumps({"peak": growth, "seconds": time.perf_counter() - t0}))


def run_child(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """Run a memory measurement in a fresh process; glibc's mmap threshold is fixed at 64 KiB
    there, so that a freed tensor leaves the resident set and peak RSS follows live memory."""
    cmd = [sys.executable, __file__, "--device", args.device, "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd + list(extra), check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def scale_memory(args: argparse.Namespace) -> str:
    what = "torch.cuda memory allocated" if args.device == "cuda" else "resident set size"
    epochs = 3 if args.quick else 5
    points = (8 if args.quick else 20) * BATCH
    r = run_child(args, "--child", "epochs", "--points", str(points), "--epochs", str(epochs))
    cols = len(r["peaks"])
    lines = [
        f"**Memory per epoch of fit() (784 dims, {points} points; {what}, MiB; "
        f"{r['before']:.0f} MiB before fit(); epoch 1 includes building the model)**",
        "",
        "| epoch | " + " | ".join(str(i + 1) for i in range(cols)) + " |",
        "|---|" + "---:|" * cols,
        "| peak during the epoch | " + " | ".join(f"{p:.1f}" for p in r["peaks"]) + " |",
        "| at the epoch's end | " + " | ".join(f"{p:.1f}" for p in r["ends"]) + " |",
        "",
    ]
    ks = (100, 400) if args.quick else (100, 300, 1000)
    points = 16
    lines += [
        f"**Peak memory of score() vs K ({points} points, 784 dims; growth of the {what} "
        "over its size before the call, MiB)**",
        "",
        "| K | chunked (100 at a time) | seconds | unchunked (K at once) | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for k in ks:
        row = []
        for chunk in (min(100, k), k):
            r = run_child(
                args, "--child", "score", "--k", str(k), "--chunk", str(chunk),
                "--points", str(points),
            )  # fmt: skip
            row += [f"{r['peak']:.1f}", f"{r['seconds']:.2f}"]
        lines.append(f"| {k} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------
def header(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "-"
    return (
        f"torch {torch.__version__}, pyro {pyro.__version__}, python {platform.python_version()}; "
        f"device {args.device} ({gpu}); CPU {cpu}, {os.cpu_count()} cores; "
        f"torch threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); load average {load[0]:.2f} at start"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer steps and rounds (about a minute)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per data set")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch intra-op threads (default: OMP_NUM_THREADS, else 1)",
    )
    p.add_argument(
        "--jit",
        action="store_true",
        help="also time DataLoader+SVI with Pyro's JitTrace_ELBO, JitTraceMeanField_ELBO and the "
        "latter with its recompilation bug fixed (FixedJitTraceMeanField_ELBO)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the hand-written VAE with its loss under torch.compile",
    )
    p.add_argument("--skip-speed", action="store_true", help="only the scale measurements")
    p.add_argument("--skip-scale", action="store_true", help="only the speed comparison")
    p.add_argument("--json", default=None, help="write the raw per-epoch numbers here")
    p.add_argument("--child", choices=("epochs", "score"), help=argparse.SUPPRESS)
    p.add_argument("--points", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # no CUDA: a one-line error, exit code 2
    if args.child:
        child(args)
        return
    if args.jit:  # Pyro's JIT ELBOs call torch.jit.trace, deprecated in torch 2.x
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated")
    rounds = args.rounds or (2 if args.quick else 5)
    print(header(args) + "\n")
    raw: dict[str, Any] = {"args": vars(args)}
    configs = [
        ("784 dims: MNIST-sized random binary data", 784, mnist_sized((15 if args.quick else 60) * BATCH), 3),
        ("64 dims: digits, binarised", 64, digits(), 4 if args.quick else 8),
    ]  # fmt: skip
    for title, dim, ds, epochs in [] if args.skip_speed else configs:
        check_same_networks(dim)
        print(f"{title}: {ds.train_x.shape[0]} points, {epochs} epochs x {rounds} rounds",
              file=sys.stderr, flush=True)  # fmt: skip
        runs = compare(ds, epochs, rounds, device, jit=args.jit, compiled=args.compile)
        title = f"{title} ({ds.train_x.shape[0]} training points, batch {BATCH})"
        print(speed_table(title, runs, fit_fused=fit_adam_is_fused(device)))
        print()
        raw[title] = {name: [vars(e) for e in r.epochs] for name, r in runs.items()}
    if not args.skip_scale:
        print(scale_time(8 if args.quick else 20, 2 if args.quick else 3, device))
        print()
        print(scale_memory(args))
        print()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.2f} at the end")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=1)


if __name__ == "__main__":
    sys.exit(run_command("speed.py", main))
