"""Argument checks shared by every layer (imports nothing from pallax).

Each helper raises ``ValueError`` naming the argument and the offending value,
so a bad input fails where it enters the library, not deep inside jax, and the
CLI can report every user error through one ``except ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (``True`` is an int to Python, not to us)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; floats (even ``2.0``) are rejected."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_optional_int(name: str, value, **bounds) -> int | None:
    return None if value is None else check_int(name, value, **bounds)


def check_float(
    name: str,
    value,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
) -> float:
    """A finite real number (int or float, not bool/str/NaN/inf) in the given interval."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if isinstance(value, np.complexfloating):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = minimum is not None and (value <= minimum if open_min else value < minimum)
    above = maximum is not None and (value >= maximum if open_max else value > maximum)
    if below or above:
        if minimum is not None and maximum is not None:
            interval = (
                f"in {'(' if open_min else '['}{minimum}, {maximum}{')' if open_max else ']'}"
            )
        elif minimum is not None:
            interval = f"{'>' if open_min else '>='} {minimum}"
        else:
            interval = f"{'<' if open_max else '<='} {maximum}"
        raise ValueError(f"{name} must be {interval}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_choice(name: str, value, choices: Iterable):
    choices = tuple(choices)
    # ``value in choices`` could call an array's __eq__; compare only hashable scalars.
    if not isinstance(value, (str, int, float, type(None))) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_array(name: str, value, *, ndim: int | None = None):
    """Something with ``shape``/``dtype`` (a jax or numpy array, or a tracer)."""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(f"{name} must be an array, got {type(value).__name__}")
    if ndim is not None and len(value.shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(value.shape)}")
    return value


def is_concrete(value) -> bool:
    """True when ``value``'s data can be read on the host (not a jit/grad tracer)."""
    import jax

    return not isinstance(value, jax.core.Tracer)


def check_finite(name: str, array) -> None:
    """Rejects NaN/inf in a concrete array, naming ``name`` and the first bad index.

    Costs one host transfer of ``array``; callers skip it for tracers."""
    import jax.numpy as jnp

    if not jnp.issubdtype(array.dtype, jnp.floating):
        return
    host = np.asarray(array, np.float32)
    bad = ~np.isfinite(host)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite value(s), e.g. {host[index]} "
            f"at index {list(index)}"
        )
