r"""What both trackers share: flattening metrics and configs into scalars and text."""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["config_text", "flatten", "is_number", "numeric_scalars"]


def flatten(data: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """The leaves of nested dicts, keyed by their paths joined with ``sep``.

    An empty nested dict is kept as a leaf (so that a config's ``prior_args = {}`` still shows).

    Example:
        >>> flatten({"a": 1, "b": {"c": 2.0, "d": {}}})
        {'a': 1, 'b/c': 2.0, 'b/d': {}}
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            for sub, leaf in flatten(value, sep).items():
                out[f"{key}{sep}{sub}"] = leaf
        else:
            out[str(key)] = value
    return out


def is_number(value: Any) -> bool:
    """A real number that is not a bool (``True`` is not a metric)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def numeric_scalars(data: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of ``data`` (nested dicts joined with ``/``) as floats.

    Strings, lists and bools are left out.
    """
    return {k: float(v) for k, v in flatten(data).items() if is_number(v)}


def config_text(value: Any) -> str:
    """A config value as text: strings as they are, anything else as JSON (``null``, ``[1, 2]``)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)
