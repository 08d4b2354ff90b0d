"""Argument checks shared by the layers and routers.

Each raises a `ValueError` that names the argument and ends with
"Received: name=value". Numbers must be real Python or NumPy numbers (not
strings, not bools) and finite, so that `"1.25"`, `nan` and `inf` are
refused the same way as a value out of range.
"""

import math
import numbers

import numpy as np


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name, value, minimum=1, maximum=None, what=None):
    """An integer in `[minimum, maximum]` (`maximum=None`: unbounded)."""
    if (
        is_integer(value)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return
    if what is None:
        what = (
            f"an integer >= {minimum}"
            if maximum is None
            else f"between {minimum} and {maximum}"
        )
    raise ValueError(f"`{name}` must be {what}. Received: {name}={value!r}")


def top_k(value, num_experts):
    """`top_k` is `None` or an integer in `[1, num_experts]`."""
    if value is not None:
        integer(
            "top_k",
            value,
            maximum=num_experts,
            what=f"between 1 and `num_experts` ({num_experts})",
        )


def number(
    name, value, minimum=None, maximum=None, min_open=False, max_open=False
):
    """A finite real number in the given range (open or closed ends)."""
    ok = _is_number(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if ok:
        return
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if min_open else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if max_open else '<='} {maximum}")
    if minimum is not None and maximum is not None:
        what = (
            f"in {'(' if min_open else '['}{minimum}, "
            f"{maximum}{')' if max_open else ']'}"
        )
    else:
        what = " and ".join(parts) if parts else "finite"
    raise ValueError(
        f"`{name}` must be a finite number {what}. Received: {name}={value!r}"
    )


def one_of(name, value, choices):
    """`value` is one of `choices` (strings, compared exactly)."""
    if isinstance(value, str) and value in choices:
        return
    raise ValueError(
        f"`{name}` must be one of {', '.join(map(repr, choices))}. "
        f"Received: {name}={value!r}"
    )


def boolean(name, value):
    """True or False (a NumPy bool too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )


def same_shape(shape, expected):
    """Whether two shapes agree (a `None` dimension matches any)."""
    return len(shape) == len(expected) and all(
        a is None or b is None or a == b for a, b in zip(shape, expected)
    )
