r"""The ``ppl-vae`` command line: one module per command, one error layer.

``fit`` (:mod:`.fit`), ``evaluate`` and ``sample`` (:mod:`.runs`), ``score`` (:mod:`.score`),
``plot`` (:mod:`.plot`), ``ssl`` (:mod:`.ssl`), ``compare`` (:mod:`.compare`); shared option
groups in :mod:`.common`. Every option has a default, so ``ppl-vae fit`` alone trains on the
built-in digits data. Bad input ends with a one-line ``error: ...`` and exit code 2, never a
traceback, and never changes an existing run directory.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence

from ..models.errors import ConfigError
from .common import EXIT_USAGE, Parser, int_list, name_list

__all__ = ["EXIT_USAGE", "Parser", "build_parser", "int_list", "main", "name_list", "run_command"]


def build_parser() -> argparse.ArgumentParser:
    """The ``ppl-vae`` parser with every command registered."""
    from .. import __version__
    from . import compare, fit, plot, runs, score, ssl

    parser = Parser(
        prog="ppl-vae",
        description="Variational autoencoders as Pyro model/guide pairs.",
    )
    parser.add_argument("--version", action="version", version=f"ppl-vae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    fit.register(sub)
    runs.register(sub)
    score.register(sub)
    plot.register(sub)
    compare.register(sub)
    ssl.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Start-up imports torch and Pyro: SIGINT there is an interruption like any other. It is
    # held until the imports finish (a KeyboardInterrupt inside a C extension's import can
    # surface as an ImportError), then answered.
    interrupted: list[bool] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    except ValueError:  # not the main thread: leave the handler alone
        previous = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        interrupted.append(True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        print("ppl-vae: interrupted", file=sys.stderr)
        return 130
    from ..training.distributed import environment

    # Under torchrun every rank reports its own error; ranks other than 0 say which they are.
    try:
        rank = environment()[0]
    except ConfigError:
        rank = 0
    prog = f"ppl-vae {args.command}" + (f" (rank {rank})" if rank else "")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return run_command(prog, lambda: args.func(args))


def run_command(prog: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn()`` and turn the library's errors into a one-line message and an exit code.

    The error layer of ``ppl-vae``, for scripts built on the library too (``examples/``,
    ``benchmarks/``): ``sys.exit(run_command("my_script.py", main))``.

    - :class:`~ppl_vae.ConfigError` (bad input: options, data, files): ``prog: error: ...``
      on stderr, exit code 2 (:data:`EXIT_USAGE`);
    - :class:`~ppl_vae.TrainingError`, out of memory, an :class:`OSError` (disk,
      permissions): the message, exit code 1;
    - ``KeyboardInterrupt``: ``prog: interrupted``, exit code 130.

    Any other exception is a bug and keeps its traceback; ``PPL_VAE_DEBUG=1`` prints the
    traceback before the line. Without an exception, ``fn``'s return value is the exit code if
    it is an ``int``; any other value (``None``, a script's results) is success, 0.
    """
    from ..train import TrainingError

    try:
        code = fn()
        return code if isinstance(code, int) else 0
    except ConfigError as e:
        _debug_traceback(e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingError as e:
        _debug_traceback(e)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError (a RuntimeError) and the CPU allocator's "can't allocate memory"
        text = str(e).strip()
        if not isinstance(e, MemoryError) and not any(
            s in text for s in ("out of memory", "can't allocate memory")
        ):
            raise
        first = text.splitlines()[0] if text else type(e).__name__
        print(
            f"{prog}: error: out of memory ({first}); try a smaller --batch-size, --hidden-dims, "
            "--latent-dim, --num-particles or --log-likelihood-samples",
            file=sys.stderr,
        )
        return 1
    except OSError as e:
        # A fault of the environment (disk, permissions) that no earlier check caught.
        _debug_traceback(e)
        where = f" ({e.filename})" if e.filename else ""
        print(f"{prog}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _debug_traceback(e: BaseException) -> None:
    """With ``PPL_VAE_DEBUG=1`` the full traceback (e.g. of a failing user component) comes
    before the one-line error."""
    if os.environ.get("PPL_VAE_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e, file=sys.stderr)
