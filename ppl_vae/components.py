r"""Resolve component specifications (``"von-mises"``, ``"file.py:Class"``, ``"pkg.mod:Class"``).

The engine never names a prior, likelihood or label guide. A name ``foo-bar`` is the module
``foo_bar`` of the component's package (``ppl_vae.models.priors``, ...), which defines exactly one
subclass of the component's base class. ``path/to/file.py:Class`` imports that file, **running
its code** (only ever when a user names it), and ``package.module:Class`` imports a module.
"""

from __future__ import annotations

import collections.abc
import importlib
import importlib.util
import inspect
import pkgutil
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .models.errors import ConfigError


@dataclass(frozen=True)
class Kind:
    """A kind of component: its package and base class."""

    name: str
    package: str | None
    base_module: str
    base_name: str
    skip: tuple[str, ...] = ("base",)

    @property
    def base(self) -> type:
        return getattr(importlib.import_module(self.base_module), self.base_name)


KINDS: dict[str, Kind] = {
    "prior": Kind("prior", "ppl_vae.models.priors", "ppl_vae.models.priors.base", "Prior"),
    "likelihood": Kind(
        "likelihood",
        "ppl_vae.models.likelihoods",
        "ppl_vae.models.likelihoods.base",
        "Likelihood",
        skip=("base", "units"),
    ),
    "label_guide": Kind(
        "label_guide", "ppl_vae.guides.labels", "ppl_vae.guides.labels.base", "LabelGuide"
    ),
    "encoder": Kind(
        "encoder", "ppl_vae.guides.encoders", "ppl_vae.guides.encoders.base", "Encoder"
    ),
    "family": Kind(
        "family",
        "ppl_vae.guides.families",
        "ppl_vae.models.distributions.family",
        "VariationalFamily",
    ),
    "decoder": Kind(
        "decoder", "ppl_vae.models.decoders", "ppl_vae.models.decoders.base", "Decoder"
    ),
    # A model/guide pair (``--model``): a shipped one or any torch module of the user's.
    "model": Kind("model", "ppl_vae.models.pairs", "torch.nn", "Module", skip=()),
}


def available(kind: str) -> list[str]:
    """Names of the shipped components of ``kind`` (module names with ``-`` for ``_``)."""
    k = KINDS[kind]
    if k.package is None:
        return []
    try:
        pkg = importlib.import_module(k.package)
    except ImportError:
        return []
    names = [
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(pkg.__path__)
        if not m.name.startswith("_") and m.name not in k.skip
    ]
    return sorted(names)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"component file {str(path)!r} does not exist")
    mod_name = f"ppl_vae_user_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # a file that calls sys.exit() is a failing file too
        del sys.modules[mod_name]
        raise UserCodeError(
            f"error in user component file {str(path)!r}: importing it failed: {_describe(e)}"
        ) from e
    return module


class UserCodeError(ConfigError):
    """A user's component file failed (at import or in its constructor): one line naming the
    file and class; ``PPL_VAE_DEBUG=1`` makes the command line print the full traceback."""


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _single_subclass(module: ModuleType, base: type, where: str) -> type:
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, base)
        and obj is not base
        and obj.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise ConfigError(
            f"{where} must define exactly one {base.__name__} subclass, found "
            f"{[c.__name__ for c in found]}"
        )
    return found[0]


def _import_target(target: str, where: str) -> ModuleType:
    """The module of a ``target:Name`` spec: a file path (its code runs) or a module name."""
    if target.endswith(".py") or "/" in target or "\\" in target:
        return _import_file(Path(target))
    try:
        return importlib.import_module(target)
    except (ImportError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot import module {target!r} for {where}: {e}") from None


def resolve(spec: str | type, kind: str) -> type:
    """Return the component class named by ``spec`` (a name, ``file.py:Class`` or ``mod:Class``)."""
    k = KINDS[kind]
    base = k.base
    if inspect.isclass(spec):
        cls = spec
    elif not isinstance(spec, str) or not spec:
        raise ConfigError(f"{kind} must be a name, 'file.py:Class' or a class, got {spec!r}")
    elif ":" in spec:
        target, _, cls_name = spec.rpartition(":")
        if not target or not cls_name:
            raise ConfigError(
                f"{kind} {spec!r} must name a module or file and a class, as 'package.module:Class' "
                "or 'path/to/file.py:Class'"
            )
        module = _import_target(target, f"{kind} {spec!r}")
        if not hasattr(module, cls_name):
            raise ConfigError(f"{target!r} has no class {cls_name!r} (for {kind} {spec!r})")
        cls = getattr(module, cls_name)
    else:
        names = available(kind)
        if spec not in names:
            raise ConfigError(
                f"Unknown {kind} {spec!r}; expected one of {names}, "
                "or 'path/to/file.py:Class' / 'package.module:Class'"
            )
        module = importlib.import_module(f"{k.package}.{spec.replace('-', '_')}")
        cls = _single_subclass(module, base, f"module {module.__name__}")
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise ConfigError(
            f"{kind} {spec!r} must be a subclass of {base.__module__}.{base.__name__}, got {cls!r}"
        )
    return cls


def resolve_function(spec: str, what: str) -> Any:
    """The function ``spec`` names, ``path/to/file.py:function`` (the file's code runs) or
    ``package.module:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(
            f"{what} {spec!r} must name a module or file and a function, as "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    module = _import_target(target, f"{what} {spec!r}")
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{target!r} has no function {name!r} (for {what} {spec!r})")
    return fn


def spec_of(obj: Any, kind: str) -> str:
    """A string spec that :func:`resolve` maps back to ``obj``'s class (for saved configs)."""
    cls = obj if inspect.isclass(obj) else type(obj)
    k = KINDS[kind]
    module = cls.__module__
    if k.package is not None and module.startswith(k.package + "."):
        return module.rsplit(".", 1)[1].replace("_", "-")
    if module.startswith("ppl_vae_user_") or module == "__main__":
        try:
            return f"{inspect.getfile(cls)}:{cls.__qualname__}"
        except (TypeError, OSError):
            return f"{module}:{cls.__qualname__}"
    return f"{module}:{cls.__qualname__}"


def build(
    spec: str | type | nn.Module, kind: str, context: dict[str, Any], args: dict[str, Any]
) -> nn.Module:
    """Instantiate a component.

    ``context`` (``latent_dim``, ``data_shape``, ``num_levels``, ...) is passed for the
    constructor parameters that accept it; ``args`` are user options, all of which must be
    accepted. An instance is returned as it is (``args`` must then be empty).
    """
    if isinstance(spec, nn.Module):
        if args:
            raise ConfigError(f"{kind} options {sorted(args)} given with a {kind} instance")
        adopt(spec)
        return spec
    cls = resolve(spec, kind)
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [a for a in args if a not in params and not accepts_kwargs]
    if unknown:
        raise ConfigError(
            f"{kind} {cls.__name__} has no option(s) {unknown}; it accepts "
            f"{[n for n in params if n not in context]}"
        )
    hints = _type_hints(cls.__init__)
    for name, value in args.items():
        if name in hints and not _matches(value, hints[name]):
            raise ConfigError(
                f"{kind} {cls.__name__} option `{name}` must be {_type_name(hints[name])}, "
                f"got {value!r}"
            )
    kwargs = {n: v for n, v in context.items() if n in params and n not in args}
    kwargs.update(args)
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        and n not in kwargs
    ]
    if missing:
        raise ConfigError(f"{kind} {cls.__name__} needs option(s) {missing}")
    if KINDS[kind].package is not None and cls.__module__.startswith(KINDS[kind].package + "."):
        return cls(**kwargs)  # a built-in component: its errors are the library's own
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:
        where = spec if isinstance(spec, str) else spec_of(cls, kind)
        raise UserCodeError(f"error in user component {where}: {_describe(e)}") from e


def adopt(module: nn.Module) -> nn.Module:
    """Make a module built in any Pyro parameter mode usable in the mode in force now.

    A :class:`~pyro.nn.PyroModule` built outside ``pyro.settings.context(module_local_params=True)``
    has no module-local parameter state, and entering it under that setting fails
    (``'_Context' object has no attribute 'param_state'``). Its parameters live in its own
    ``_parameters`` in both modes, so giving each PyroModule an empty local state is all it needs.
    """
    from pyro.nn import PyroModule

    for m in module.modules():
        context = m.__dict__.get("_pyro_context") if isinstance(m, PyroModule) else None
        if context is not None and not hasattr(context, "param_state"):
            context.param_state = {"params": {}, "constraints": {}}
    return module


def recorded_options(obj: nn.Module, kind: str, context: tuple[str, ...]) -> dict[str, Any]:
    """The constructor options of a component instance, as config data (no ``context`` keys).

    Raises:
        ConfigError: options that are unknown or cannot be written to ``config.toml`` (the run
            could then not be rebuilt exactly).
    """
    from .models.options import init_options

    options = init_options(obj)
    name = type(obj).__name__
    if options is None:
        raise ConfigError(
            f"the {kind} instance {name} does not record its constructor options, so the run "
            f"could not be reopened; pass the {kind} as a name or class with {kind}_args"
        )
    out = {k: v for k, v in options.items() if k not in context}
    for key, value in out.items():
        if not _plain(value):
            raise ConfigError(
                f"option `{key}` of the {kind} instance {name} is a {type(value).__name__}, which "
                f"config.toml cannot hold, so the run could not be reopened; pass the {kind} as a "
                f"name or class with {kind}_args of numbers, strings and lists"
            )
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _plain(value: Any) -> bool:
    if isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _type_hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: nothing to check against
        return {}


def _matches(value: Any, hint: Any) -> bool:
    """Whether a user option value fits a simple annotation; unknown annotations accept all."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        return isinstance(value, list | tuple)
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
