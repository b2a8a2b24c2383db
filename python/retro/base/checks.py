"""Checks of user-facing options, shared by the options dataclasses and the command line. Each
raises RetroError naming the option, the value it got and what was expected, e.g.
"--top-p must be a number in (0, 1], got 1.5"."""
from __future__ import annotations

import math
import numbers

from .errors import RetroError

MAX_NEIGHBOURS = 40  # k: neighbours per chunk, for training, decoding and evaluation


def _bounds(low, high, low_open: bool, high_open: bool) -> str:
    """The accepted range in words: '>= 1', '> 0', 'in (0, 1]'."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""


def _inside(value, low, high, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def check_number(name: str, value, kind: type = int, low=None, high=None, *, low_open: bool = False,
                 high_open: bool = False, optional: bool = False):
    """Checks that `value` is an int (kind int) or a finite real number (kind float) within
    [low, high] (an end is left out where None, excluded where *_open); None passes when
    optional. Returns the value."""
    if value is None and optional:
        return value
    what = f"{'an integer' if kind is int else 'a number'} {_bounds(low, high, low_open, high_open)}".rstrip()
    wanted = numbers.Integral if kind is int else numbers.Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise RetroError(f"{name} must be {what}, got {value!r}")
    if not math.isfinite(value) or not _inside(value, low, high, low_open, high_open):
        raise RetroError(f"{name} must be {what}, got {value!r}")
    return value


def check_int(name: str, value, low=None, high=None, *, optional: bool = False):
    """An integer in [low, high]; None passes when optional."""
    return check_number(name, value, int, low, high, optional=optional)


def check_float(name: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                optional: bool = False):
    """A finite real number between low and high (ends excluded where *_open)."""
    return check_number(name, value, float, low, high, low_open=low_open, high_open=high_open, optional=optional)


def check_neighbours(name: str, value, *, optional: bool = False):
    """k, neighbours per chunk: 1 to MAX_NEIGHBOURS."""
    return check_int(name, value, 1, MAX_NEIGHBOURS, optional=optional)


def check_choice(name: str, value, choices, *, optional: bool = False):
    """One of `choices` (the error lists them)."""
    if value is None and optional:
        return value
    if value not in choices:
        raise RetroError(f"{name} must be one of {', '.join(map(str, sorted(choices)))}; got {value!r}")
    return value
