r"""Multi-process training on :mod:`torch.distributed`: process group, shards, DDP, rank 0's I/O.

``torchrun --nproc-per-node N -m ppl_vae.cli fit ...`` (or ``torchrun --nproc-per-node N
--no-python ppl-vae fit ...``) starts N processes whose environment holds ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; :func:`ppl_vae.fit` sees
``WORLD_SIZE > 1`` and trains with :class:`~torch.nn.parallel.DistributedDataParallel`. With
``WORLD_SIZE`` unset or 1 nothing here does anything and training is the single-process code path,
bit for bit.

The conventions, in the order a step meets them:

- **Process group.** gloo on CPU; on a machine with CUDA, ``"cpu:gloo,cuda:nccl"``, so the
  gradients of a model on ``cuda:LOCAL_RANK`` travel by NCCL while the small control messages
  (configs, checkpoints, metrics) go by gloo. A group that is already initialised is used as it
  is and left open.
- **Data.** Every rank loads the whole data set and draws the same per-epoch permutation from the
  shared seed; rank :math:`r` of :math:`W` takes part :math:`r` of
  ``torch.tensor_split(batch_indices, W)`` of every global batch (sizes differ by at most one).
- **Loss.** Each rank's loss is the estimator's loss of its shard, a sum over its points, computed
  inside the forward of the DDP-wrapped :class:`DistributedLoss` (calling the ELBO on
  ``ddp.module`` would bypass gradient averaging). DDP averages gradients over ranks, so the shard
  loss is multiplied by :math:`W` and the averaged gradient is the single-process gradient of the
  global batch :math:`x = \bigcup_r x_r`:

  .. math:: \frac{1}{W} \sum_{r=1}^{W} \nabla_\theta \big(W\,\mathcal{L}(x_r)\big)
      = \nabla_\theta \sum_{r=1}^{W} \mathcal{L}(x_r) = \nabla_\theta \mathcal{L}(x).

  The reported training loss is the sum of the shard losses (all-reduced), so a non-finite loss
  on any rank stops every rank at the same step.
- **Noise.** At the start of every epoch each rank re-seeds its random streams from
  ``(seed, epoch, rank)``, so ranks draw independent noise and a resumed run draws exactly the
  noise an uninterrupted one does (the checkpoint holds rank 0's generator states only).
- **Run directory.** Rank 0 alone reads and writes it (config, checkpoints, history, metrics,
  figures) and computes the validation and test metrics; :func:`on_main` hands its result, or
  its error, to every rank, which also makes each checkpoint write a barrier. On resume rank 0
  loads the checkpoint (on the CPU) and every rank receives it, so other nodes need no shared
  file system.

Test hook: with ``PPL_VAE_DIST_DUMP=DIR`` in the environment, every rank saves its trained
model's ``state_dict`` (on the CPU) to ``DIR/rank{RANK}.pt`` at the end of training, so a test
can check that all ranks hold the same parameters. Nothing else reads this variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import nn

from ..models.errors import ConfigError

__all__ = [
    "DUMP_ENV",
    "Context",
    "DistributedLoss",
    "environment",
    "is_main_process",
    "setup",
    "teardown",
]

T = TypeVar("T")

#: Environment variable of the test hook (see the module docstring).
DUMP_ENV = "PPL_VAE_DIST_DUMP"


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {text!r}") from None


def environment() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from ``torchrun``'s environment (``(0, 1, 0)`` if unset)."""
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(
            f"inconsistent torch.distributed environment: RANK={rank}, WORLD_SIZE={world}, "
            f"LOCAL_RANK={local}; expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0"
        )
    return rank, world, local


def is_main_process() -> bool:
    """True unless this is a rank other than 0 of a multi-process job (for printing)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return environment()[0] == 0
    except ConfigError:
        return True


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reads and writes the run directory."""
        return self.rank == 0

    # -- devices and data ---------------------------------------------------------------------
    def device(self, name: str) -> torch.device:
        """``cuda:LOCAL_RANK`` for ``auto``/``cuda`` when CUDA is available, else the CPU."""
        if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA device is available")
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise ConfigError(
                f"LOCAL_RANK {self.local_rank} has no GPU: this node has {count}; start at most "
                f"{count} processes per node (--nproc-per-node)"
            )
        device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)
        return device

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch's indices (all of them in a single process)."""
        if not self.enabled:
            return index
        return index.tensor_split(self.world_size)[self.rank]

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """Re-seed this rank's random streams from ``(seed, epoch, rank)`` (no-op alone)."""
        if self.enabled:
            state = np.random.SeedSequence([seed, epoch, self.rank]).generate_state(1)
            pyro.set_rng_seed(int(state[0]))

    # -- the loss -----------------------------------------------------------------------------
    def wrap(
        self, vae: nn.Module, loss: Callable[..., torch.Tensor], device: torch.device
    ) -> Callable[..., torch.Tensor]:
        """``loss`` itself alone; under several processes a DDP module around it."""
        if not self.enabled:
            return loss
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedLoss(vae, loss, self.world_size)
        return DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )

    def loss_value(self, loss: torch.Tensor) -> torch.Tensor:
        r"""The global batch's loss from this rank's (detached) output of :meth:`wrap`'s callable.

        .. math:: \mathcal{L}(x) = \sum_r \mathcal{L}(x_r) = \sum_r W\mathcal{L}(x_r) / W
        """
        if not self.enabled:
            return loss
        total = loss / self.world_size
        dist.all_reduce(total)
        return total

    # -- rank 0's work ------------------------------------------------------------------------
    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its result or raises its error.

        The error reaches the other ranks as the same exception class with the same message
        if it is one of Python's or ppl_vae's (e.g. :class:`~ppl_vae.ConfigError`), else as a
        :class:`RuntimeError` with that message.
        """
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                error = e
                known = type(e).__module__.split(".")[0] in ("builtins", "ppl_vae")
                box[0] = ("error", type(e) if known else RuntimeError, str(e))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        kind, *rest = box[0]
        if kind == "ok":
            return rest[0]
        cls, message = rest
        try:
            rebuilt = cls(message)
        except Exception:
            rebuilt = RuntimeError(message)
        raise rebuilt

    def dump(self, vae: nn.Module) -> Path | None:
        """The test hook: save ``vae``'s state to ``$PPL_VAE_DIST_DUMP/rank{rank}.pt``."""
        target = os.environ.get(DUMP_ENV)
        if not target:
            return None
        path = Path(target) / f"rank{self.rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in vae.state_dict().items()}, path)
        return path


class DistributedLoss(nn.Module):
    r"""The module DDP wraps: ``forward(*batch)`` is :math:`W` times the step loss of the shard.

    .. math:: \texttt{forward}(x_r) = W\,\mathcal{L}(x_r)

    Its parameters are the VAE's, so DDP's gradient hooks cover exactly what the optimiser steps.
    Every parameter enters the output (those the loss does not use with weight zero), so DDP
    finds a gradient for each one on every step whatever the prior, likelihood or estimator. An
    empty shard (every tensor of the batch has no rows: a last batch with fewer points than
    ranks) gives zero with zero gradients. A
    distribution that rejects non-finite parameters gives a NaN loss here, so that every rank
    reaches the all-reduce and stops together.

    Args:
        vae: the model whose parameters are trained.
        loss: ``loss(*batch)``, the kind's per-step loss of this shard
            (:meth:`ppl_vae.kinds.base.ModelKind.loss`).
        world_size: :math:`W`, the number of processes.
    """

    def __init__(self, vae: nn.Module, loss: Callable[..., torch.Tensor], world_size: int) -> None:
        super().__init__()
        self.vae = vae
        self.loss = loss
        self.world_size = world_size

    def _zero(self) -> torch.Tensor:
        return sum(p.sum() * 0 for p in self.vae.parameters())

    def forward(self, *batch: Any) -> torch.Tensor:
        tensors = [t for t in batch if isinstance(t, torch.Tensor)]
        if tensors and all(t.shape[0] == 0 for t in tensors):
            return self._zero()
        try:
            return self.loss(*batch) * self.world_size + self._zero()
        except ValueError as e:
            if "invalid values" not in str(e):
                raise
            return self._zero() * float("nan")


def setup() -> Context:
    """Join the process group ``torchrun`` describes; a single :class:`Context` without one."""
    rank, world, local = environment()
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), local, owns_group=False)
    if world == 1:
        return Context()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Context(rank, world, local, owns_group=True)


def teardown(ctx: Context) -> None:
    """Leave the process group if :func:`setup` created it."""
    if ctx.owns_group and dist.is_available() and dist.is_initialized():
        try:
            # No rank closes its connections while a peer still uses them: without this, a
            # rank that finishes first can make gloo abort its peers at exit under load.
            dist.barrier()
        finally:
            dist.destroy_process_group()
