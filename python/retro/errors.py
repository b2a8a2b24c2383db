"""The one exception users of the retro package see for bad input or bad files."""


class RetroError(ValueError):
    """A clear, user-facing error: what was wrong, the value, and what was expected.
    The command line prints it and exits with status 2."""
