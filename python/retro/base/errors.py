"""The one exception users of the retro package see for bad input or bad files."""
from __future__ import annotations

from pathlib import Path


class RetroError(ValueError):
    """A clear, user-facing error: what was wrong, the value, and what was expected.
    The command line prints it and exits with status 2."""


def damaged_file(path: str | Path, problem: str, remedy: str) -> RetroError:
    """The error for a file that is there but cannot be read (truncated, overwritten): its path,
    what is wrong with it, and what to do."""
    problem = " ".join(str(problem).split())
    return RetroError(f"{str(path)!r} is damaged ({problem[:300]}); {remedy}")
