r"""Speed of ``ppl-vae ssl``'s M2 step against a hand-written PyTorch M2 with the same networks.

One step is what the trainer does per batch (:meth:`ppl_vae.training.trainer.Trainer._step`,
after :meth:`~ppl_vae.kinds.base.ModelKind.begin_step`): ``zero_grad``,
:meth:`ppl_vae.kinds.m2.M2Kind.loss` (labelled bound, unlabelled bound, classification term),
the finite-loss check, ``backward`` and the fused Adam step. Variants, in one process,
interleaved round by round (the order alternates every round), on the same batches:

``ppl_vae``
    The trainer's step on an :class:`~ppl_vae.kinds.m2.M2Kind` built as ``ppl-vae ssl`` builds
    it (:func:`ppl_vae.ssl.build_ssl_run`, the SSL defaults: latent 16, hidden ``[256, 128]``,
    ``network=auto``, 128 unlabelled and 100 labelled points per step, Adam at 1e-3), with the
    M2 fast path (:mod:`ppl_vae.inference.m2_fastpath`) where it applies.
``ppl_vae, Pyro ELBOs``
    The same step with the fast path off (``M2Kind.fast = False``): every term is Pyro's
    ``TraceEnum_ELBO`` / ``Trace_ELBO`` ``differentiable_loss``. (Before the fast path existed
    this was ``ppl_vae``.)
``ppl_vae, p(z) distribution`` (only with ``--ablate-log-density``)
    ``ppl_vae`` with p(z) scored as before :meth:`~ppl_vae.models.priors.base.Prior.log_density`
    existed: through the distribution ``SSVAE.p_z`` builds (``StandardNormal(0, 1).to_event(1)``,
    its ``log_prob``), which measures what that hook saves.
``hand, fused Adam``
    A hand-written PyTorch M2 (:class:`HandM2`) on deep copies of the same modules (the
    encoder's feature network and head, the decoder, the classifier network: same layers, same
    initial weights), with the trainer's own optimiser, :func:`ppl_vae.training.optim.make_adam`
    (fused Adam where the kernel exists), no per-step host synchronisation.
    ``enumerate``: the exact sum over the K classes, one z per class, the encoder's feature
    network once and its head on ``(K, N)``, the decoder on ``K N`` codes, closed-form Gaussian
    KL, ``binary_cross_entropy_with_logits``; ``relaxed``: one Gumbel-softmax draw of y per
    point at the same annealed temperature, scored with the same linearised log-mass as
    :class:`~ppl_vae.guides.labels.relaxed.GumbelSoftmaxCategorical`. The step loss has the
    weights of ``M2Kind.loss`` (``w_l``, ``w_u``, ``alpha``, the global batch sizes).
    **The primary ratios are to this variant**: the same optimiser implementation on both sides.
``hand, default Adam``
    The same with ``torch.optim.Adam`` at its defaults (the per-tensor update on the CPU): a
    secondary reference, against which ``ppl_vae`` also gets the fused kernel's credit.

Cases: flat 64-d (scikit-learn's digits, binarised once), flat 784-d (random binary data,
Bernoulli(0.13) pixels, MNIST's mean) and 3x32x32 (random binary data, Bernoulli(0.5), SVHN's
shape) with the convolutional networks ``network=auto`` picks there; labels uniform over 10
classes; a Bernoulli likelihood and the standard normal prior everywhere (speed does not depend
on the values). Synthetic data stand in for MNIST and SVHN: only the shapes matter here.

Each round runs every variant for ``--steps`` timed steps after an untimed one; ms/step is the
median over rounds (of each round's mean), the ratio is ``hand, fused Adam``'s ms/step ÷
``ppl_vae``'s (speed relative to the hand-written M2 with the same optimiser; target >= 0.9;
the ratio to ``hand, default Adam`` is a secondary column), and "paired" is the median over rounds
of that ratio within each round, which resists a machine whose speed drifts during the run;
the table gives both in wall time and in process CPU time, which moves less with the load of
other processes on a shared machine.

``--epoch28 EPOCHS`` instead times whole epochs (validation included) of ``ppl-vae ssl``'s
defaults on 1x28x28 data, scikit-learn's digits upsampled (bilinear) and stored as 8-bit
images: ``network=conv`` (what ``auto`` picked there before M2's ``auto`` took the MLP for
one-channel images up to 28x28) against ``network=mlp`` (``auto`` now), each with
the fast path and with Pyro's ELBOs, one after the other (not interleaved).

Run: ``OMP_NUM_THREADS=1 python benchmarks/m2_speed.py`` (the README's table, a few minutes on
one CPU thread); ``--quick`` for a smoke test (tiny batches, no meaningful times);
``--device cuda`` on a GPU; ``--profile CASE:GUIDE`` prints the cProfile of ``ppl_vae``'s step;
``--json FILE`` keeps the raw numbers; ``--epoch28 3`` the README's epoch times.
"""

from __future__ import annotations

import copy
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
import torch.nn.functional as F
from torch import nn

from ppl_vae.cli import Parser, name_list, run_command
from ppl_vae.data import Dataset, load_data
from ppl_vae.kinds.base import StepState
from ppl_vae.kinds.m2 import M2Kind
from ppl_vae.ssl import SSVAE, SSLConfig, build_ssl_run
from ppl_vae.training.optim import make_adam
from ppl_vae.training.setup import initialize_from_data, resolve_device
from ppl_vae.training.trainer import Settings, Trainer

NUM_CLASSES = 10
SHAPES: dict[str, tuple[int, ...]] = {"64": (64,), "784": (784,), "3x32x32": (3, 32, 32)}
GUIDES = ("enumerate", "relaxed")
#: The primary reference: the hand-written M2 with the trainer's optimiser (``make_adam``).
REFERENCE = "hand, fused Adam"
#: The secondary reference: the same with ``torch.optim.Adam`` at its defaults.
DEFAULT_ADAM_REFERENCE = "hand, default Adam"
VARIANTS = ("ppl_vae", "ppl_vae, Pyro ELBOs", REFERENCE, DEFAULT_ADAM_REFERENCE)
#: ``--ablate-log-density``'s extra variant: p(z) through its distribution.
P_Z_DISTRIBUTION = "ppl_vae, p(z) distribution"


# -- data --------------------------------------------------------------------------------------
def dataset(case: str, num_train: int, seed: int = 0) -> Dataset:
    """Digits (binarised once) for ``"64"``; random binary data of the shape otherwise."""
    if case == "64":
        return load_data("digits", binarize="static", seed=seed)
    shape = SHAPES[case]
    rng = np.random.default_rng(seed)
    density = 0.13 if case == "784" else 0.5
    n = int(num_train / 0.8) + 1
    x = rng.random((n, *shape)) < density
    y = rng.integers(0, NUM_CLASSES, size=n)
    return load_data(x, labels=y, val_fraction=0.1, test_fraction=0.1, seed=seed)


# -- ppl_vae's step ----------------------------------------------------------------------------
@dataclass
class Setup:
    """One case: the M2 kind and trainer as ``ppl-vae ssl`` builds them, and its batches."""

    kind: M2Kind
    trainer: Trainer
    batches: list[tuple[Any, ...]]
    total_steps: int


def build_setup(
    case: str, guide: str, device: torch.device, batch_size: int, labels: int, num_batches: int
) -> Setup:
    cfg = SSLConfig(
        labels=labels,
        label_guide=guide,
        likelihood="bernoulli",
        batch_size=batch_size,
        epochs=1,
        device=str(device),
        latent_diagnostics=False,
        seed=0,
    )
    ds = dataset(case, num_train=max(batch_size * num_batches, 4 * labels))
    built = build_ssl_run(cfg, dataset=ds, device=device)
    assert not built.dynamic, "the benchmark's data are binary: no dynamic binarisation"
    initialize_from_data(built.model, built.splits[0])
    kind = M2Kind(
        built.model, built.config, built.dataset, built.splits, built.labelled,
        built.unlabelled, built.dynamic, device,
    )  # fmt: skip
    trainer = Trainer(
        kind, Settings(epochs=1, lr=built.config.lr, seed=0), device=device, quiet=True
    )
    kind.start_epoch(0, device)
    steps = min(num_batches, kind.steps_per_epoch())
    batches = [kind.batch(b, trainer.ctx.shard) for b in range(steps)]
    # Full batches only, so every step has the same cost.
    batches = [b for b in batches if len(b[2]) == batch_size] or batches[:1]
    return Setup(kind, trainer, batches, total_steps=1000)


class PplStep:
    """The trainer's step on the kind, over the setup's batches (cycled); ``log_density=False``
    scores p(z) through ``SSVAE.p_z``'s distribution (the fast path's own switch)."""

    def __init__(self, setup: Setup, fast: bool, log_density: bool = True) -> None:
        self.setup, self.fast, self.i = setup, fast, 0
        # (M2Loss scores p(z) by log_density while model.p_z is this method, SSVAE's own)
        self.engine_p_z = SSVAE.p_z if log_density else None

    def __call__(self) -> None:
        s = self.setup
        kind = s.kind
        kind.fast = self.fast
        kind.terms._engine_p_z = self.engine_p_z
        b = self.i % len(s.batches)
        step = self.i % s.total_steps
        kind.begin_step(StepState(0, step, s.total_steps, step / (s.total_steps - 1), 1.0))
        s.trainer._step(s.batches[b], 0, b, len(s.batches))
        self.i += 1


# -- the hand-written M2 -----------------------------------------------------------------------
class HandM2(nn.Module):
    r"""M2 written by hand on copies of an SSVAE's networks (Gaussian prior and q, Bernoulli).

    .. math:: J = \frac{w_l}{B_l} \sum_l -\mathcal{L}(x, y)
        + \frac{\alpha}{B_l} \sum_l -\log q(y \mid x) + \frac{w_u}{B_u} \sum_u -\mathcal{U}(x)
    """

    def __init__(self, kind: M2Kind, guide: str, fused: bool) -> None:
        super().__init__()
        model = copy.deepcopy(kind.model)
        self.encoder = model.encoder  # encoder.features(x): its feature network
        self.head = model.encoder.head
        self.decoder = model.decoder
        self.classifier = model.label_guide.net
        self.latent_dim = model.encoder.latent_dim
        self.k = model.num_classes
        self.log_py = model.class_logits.clone()
        self.guide = guide
        self.w_l, self.w_u, self.alpha = kind.w_l, kind.w_u, float(kind.alpha)
        self.t0 = model.label_guide.__dict__.get("initial_temperature", 1.0)
        self.t1 = model.label_guide.__dict__.get("final_temperature", 1.0)
        self.temperature = self.t0
        self.optimizer = (
            make_adam(self.parameters(), lr=kind.cfg.lr)  # the trainer's optimiser
            if fused
            else torch.optim.Adam(self.parameters(), lr=kind.cfg.lr)
        )

    def encode(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.head(torch.cat([h, y], -1)).clamp(-15.0, 15.0)
        loc, log_scale = raw.split(self.latent_dim, -1)
        scale = log_scale.exp()
        z = loc + scale * torch.randn_like(loc)
        kl = 0.5 * (loc.square() + scale.square() - 1.0).sum(-1) - log_scale.sum(-1)
        return z, kl

    def reconstruction(self, z: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z, y) per point, ``z.shape[:-1]``."""
        logits = self.decoder(z, y).reshape(*z.shape[:-1], *x.shape[1:])
        bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
        return -bce.flatten(z.dim() - 1).sum(-1)

    def loss(self, x_l: torch.Tensor, y_l: torch.Tensor, x_u: torch.Tensor, b_l: int, b_u: int):
        k = self.k
        # labelled: L(x, y) and the classification term
        y1 = F.one_hot(y_l, k).to(x_l.dtype)
        z, kl = self.encode(self.encoder.features(x_l), y1)
        elbo_l = (self.reconstruction(z, y1, x_l) - kl + self.log_py[y_l]).sum()
        loss_c = F.cross_entropy(self.classifier(x_l), y_l, reduction="sum") / b_l
        loss = self.w_l * (-elbo_l / b_l) + self.alpha * loss_c
        # unlabelled: U(x)
        log_q = self.classifier(x_u).log_softmax(-1)  # (N, K)
        h = self.encoder.features(x_u)
        n = x_u.shape[0]
        if self.guide == "enumerate":
            eye = torch.eye(k, dtype=x_u.dtype, device=x_u.device)[:, None].expand(k, n, k)
            z, kl = self.encode(h.expand(k, *h.shape), eye)  # (K, N, D), (K, N)
            log_q_t = log_q.t()
            terms = self.reconstruction(z, eye, x_u) - kl + self.log_py[:, None] - log_q_t
            elbo_u = (log_q_t.exp() * terms).sum()
        else:  # relaxed: one Gumbel-softmax draw per point, linearised log-mass
            u = torch.rand_like(log_q).clamp_(torch.finfo(log_q.dtype).tiny, 1.0)
            y = ((log_q - (-u.log()).log()) / self.temperature).softmax(-1)
            z, kl = self.encode(h, y)
            elbo_u = self.reconstruction(z, y, x_u) - kl + (y * (self.log_py - log_q)).sum(-1)
            elbo_u = elbo_u.sum()
        return loss + self.w_u * (-elbo_u / b_u)

    def anneal(self, progress: float) -> None:
        self.temperature = self.t0 * (self.t1 / self.t0) ** progress


class HandStep:
    def __init__(self, setup: Setup, guide: str, fused: bool) -> None:
        self.setup = setup
        self.m2 = HandM2(setup.kind, guide, fused)
        self.i = 0

    def __call__(self) -> None:
        s, m2 = self.setup, self.m2
        step = self.i % s.total_steps
        m2.anneal(step / (s.total_steps - 1))
        m2.optimizer.zero_grad(set_to_none=True)
        m2.loss(*s.batches[self.i % len(s.batches)]).backward()
        m2.optimizer.step()
        self.i += 1


# -- timing ------------------------------------------------------------------------------------
@dataclass
class Result:
    case: str
    guide: str
    ms: dict[str, list[float]] = field(default_factory=dict)  # variant -> wall ms/step per round
    cpu: dict[str, list[float]] = field(default_factory=dict)  # variant -> CPU ms/step per round
    steps: int = 0  # timed steps per variant per round

    def median(self, variant: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.ms)[variant])

    def ratio(self, variant: str, to: str = REFERENCE, cpu: bool = False) -> float:
        """``to``'s median ms/step over ``variant``'s: the variant's speed relative to ``to``."""
        return self.median(to, cpu) / self.median(variant, cpu)

    def paired(self, variant: str, to: str = REFERENCE, cpu: bool = False) -> float:
        """The median over rounds of the ratio within each round."""
        t = self.cpu if cpu else self.ms
        return statistics.median(h / m for h, m in zip(t[to], t[variant], strict=True))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """Mean wall and process-CPU ms per step over ``steps`` steps, after an untimed one."""
    step()
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    t1, c1 = time.perf_counter(), time.process_time()
    return 1000.0 * (t1 - t0) / steps, 1000.0 * (c1 - c0) / steps


def run_case(
    case: str, guide: str, device: torch.device, *, rounds: int, steps: int | None,
    batch_size: int, labels: int, variants: tuple[str, ...], target_ms: float = 1000.0,
) -> Result:  # fmt: skip
    setup = build_setup(case, guide, device, batch_size, labels, num_batches=16)
    fns: dict[str, Callable[[], None]] = {}
    for v in variants:
        if v.startswith("ppl_vae"):
            fast = v in ("ppl_vae", P_Z_DISTRIBUTION)
            fns[v] = PplStep(setup, fast=fast, log_density=(v != P_Z_DISTRIBUTION))
        else:
            fns[v] = HandStep(setup, guide, fused=(v == REFERENCE))
    # The fast path's first (validated Pyro) step, outside the timings; then the number of
    # steps that takes about ``target_ms`` for the slowest-looking variant (``steps=None``).
    fns[variants[0]]()
    if steps is None:
        est = max(time_steps(fns[v], 1, device)[0] for v in variants)
        steps = int(min(50, max(2, round(target_ms / est))))
    result = Result(case, guide, {v: [] for v in variants}, {v: [] for v in variants}, steps)
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            wall, cpu = time_steps(fns[v], steps, device)
            result.ms[v].append(wall)
            result.cpu[v].append(cpu)
    return result


def table(results: list[Result], variants: tuple[str, ...]) -> str:
    """ms/step (wall) per variant, then each variant's speed relative to :data:`REFERENCE` (the
    hand-written M2 with the trainer's optimiser): the ratio of medians, "paired" (median over
    rounds of the within-round ratio) and the same two in CPU time; last, the secondary ratio of
    ``ppl_vae`` to :data:`DEFAULT_ADAM_REFERENCE`."""
    others = [v for v in variants if v != REFERENCE]
    secondary = "ppl_vae" in variants and DEFAULT_ADAM_REFERENCE in variants
    head = "| case | guide | " + " | ".join(f"{v} ms/step" for v in variants) + " | "
    head += " | ".join(f"{v} ÷ {REFERENCE}: wall (paired), CPU (paired)" for v in others)
    if secondary:
        head += f" | secondary: ppl_vae ÷ {DEFAULT_ADAM_REFERENCE}: wall (paired), CPU (paired)"
    head += " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cell(v: str, to: str) -> str:
        return (
            f"{r.ratio(v, to):.2f}x ({r.paired(v, to):.2f}x), {r.ratio(v, to, cpu=True):.2f}x "
            f"({r.paired(v, to, cpu=True):.2f}x)"
        )

    for r in results:
        cells = [f"{r.median(v):.2f}" for v in variants]
        ratios = [cell(v, REFERENCE) for v in others]
        if secondary:
            ratios.append(cell("ppl_vae", DEFAULT_ADAM_REFERENCE))
        lines.append(f"| {r.case} | {r.guide} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


def profile(case: str, guide: str, device: torch.device, steps: int) -> None:
    setup = build_setup(case, guide, device, 128, 100, num_batches=16)
    step = PplStep(setup, fast=True)
    for _ in range(3):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def digits_28x28() -> Dataset:
    """Digits upsampled to 1x28x28 (bilinear), quantised to 8 bits like MNIST; digits' split."""
    ds = load_data("digits")
    x = torch.cat([ds.train_x, ds.val_x, ds.test_x]).reshape(-1, 1, 8, 8)
    y = torch.cat([ds.train_y, ds.val_y, ds.test_y])
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    x8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return load_data(x8, labels=y.numpy(), seed=0)


def epoch_seconds(network: str, fast: bool, epochs: int, device: torch.device) -> list[float]:
    """Seconds per epoch (validation included) of ``ppl-vae ssl``'s defaults on 1x28x28 data,
    built as :func:`ppl_vae.ssl.fit_ssl` builds the run, without its final evaluation."""
    cfg = SSLConfig(network=network, epochs=epochs, device=str(device), seed=0)
    built = build_ssl_run(cfg, dataset=digits_28x28(), device=device)
    initialize_from_data(built.model, built.splits[0])
    kind = M2Kind(
        built.model, built.config, built.dataset, built.splits, built.labelled,
        built.unlabelled, built.dynamic, device,
    )  # fmt: skip
    kind.fast = fast
    c = built.config
    settings = Settings(epochs=epochs, lr=c.lr, clip_norm=c.clip_norm, seed=c.seed)
    trainer = Trainer(kind, settings, device=device, quiet=True)
    return [row["seconds"] for row in trainer.fit()]


def epoch_table(epochs: int, device: torch.device) -> str:
    lines = [
        "| network | M2 loss | s/epoch (epochs 2..) | s for the 100 default epochs |",
        "|---|---|---:|---:|",
    ]
    for network in ("conv", "mlp"):
        for fast in (True, False):
            secs = epoch_seconds(network, fast, epochs, device)[1:]
            med = statistics.median(secs)
            label = "fast path" if fast else "Pyro ELBOs"
            name = "mlp (auto)" if network == "mlp" else network
            lines.append(f"| {name} | {label} | {med:.2f} | {100 * med / 60:.1f} min |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="smoke test: tiny batches, 2 rounds")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--steps", type=int, default=None,
        help="timed steps per variant per round (default: about 1 s of the slowest variant)",
    )  # fmt: skip
    p.add_argument("--cases", type=name_list(SHAPES), default=",".join(SHAPES))
    p.add_argument("--guides", type=name_list(GUIDES), default=",".join(GUIDES))
    p.add_argument(
        "--profile", metavar="CASE:GUIDE", help="cProfile ppl_vae's step, e.g. 64:enumerate"
    )
    p.add_argument("--json", metavar="FILE")
    p.add_argument(
        "--ablate-log-density", action="store_true",
        help=f"also time {P_Z_DISTRIBUTION!r}: p(z) through its distribution, not log_density",
    )  # fmt: skip
    p.add_argument(
        "--epoch28", type=int, metavar="EPOCHS", default=0,
        help="instead: seconds per epoch of ppl-vae ssl's defaults on digits upsampled to 28x28",
    )  # fmt: skip
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    with pyro.settings.context(module_local_params=True):
        if args.epoch28:
            print(f"ppl-vae ssl defaults, digits upsampled to 1x28x28, {device}, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
            print(epoch_table(args.epoch28, device))
            return []
        if args.profile:
            case, guide = args.profile.split(":")
            profile(case, guide, device, args.steps or 20)
            return []
        batch, labels, rounds, steps = 128, 100, args.rounds, args.steps
        if args.quick:
            batch, labels, rounds, steps = 4, 10, 2, 1
        variants = VARIANTS + ((P_Z_DISTRIBUTION,) if args.ablate_log_density else ())
        results = []
        for case in args.cases:
            for guide in args.guides:
                r = run_case(
                    case, guide, device, rounds=rounds, steps=steps, batch_size=batch,
                    labels=labels, variants=variants,
                )  # fmt: skip
                results.append(r)
                print(f"{case} {guide}: " + ", ".join(
                    f"{v} {r.median(v):.2f} ms" for v in variants
                ) + f" ({r.steps} steps x {rounds} rounds)", file=sys.stderr, flush=True)  # fmt: skip
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        f"M2 step, {device} ({platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, pyro {pyro.__version__}, OMP_NUM_THREADS={threads}, "
        f"torch threads {torch.get_num_threads()}); batch {batch} unlabelled + {labels} labelled, "
        f"{rounds} rounds"
    )
    print(table(results, variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [{"case": r.case, "guide": r.guide, "steps": r.steps, "ms": r.ms, "cpu_ms": r.cpu}
                 for r in results],
                f, indent=1,
            )  # fmt: skip
    return results


if __name__ == "__main__":
    sys.exit(run_command("m2_speed.py", main))
