r"""Components remember how they were built, so a run can record them and rebuild them exactly.

An instance of a component class (a prior, a likelihood, ...) passed to ``fit()`` must end up in
the run's ``config.toml`` as its class spec *and* its constructor options; otherwise reopening the
run would build the component with other options and load the weights into the wrong shapes.
:class:`RecordsOptions` captures the arguments of every construction in ``__new__``, before any
subclass ``__init__`` runs, so no component author has to do anything.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["RecordsOptions", "init_options"]


class RecordsOptions:
    """Mixin: ``init_options(obj)`` returns the arguments ``obj`` was constructed with."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
        except TypeError:  # e.g. copy/pickle reconstructing without arguments
            options = None
        else:
            options = {}
            params = inspect.signature(cls.__init__).parameters
            for name, value in list(bound.arguments.items())[1:]:
                if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                    options.update(value)
                elif params[name].kind is inspect.Parameter.VAR_POSITIONAL:
                    options = None  # positional varargs cannot be recorded by name
                    break
                else:
                    options[name] = value
        object.__setattr__(obj, "_init_options", options)
        return obj


def init_options(obj: Any) -> dict[str, Any] | None:
    """The keyword arguments ``obj`` was built with (None if they are unknown)."""
    options = obj.__dict__.get("_init_options")
    return None if options is None else dict(options)
