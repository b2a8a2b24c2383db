"""Progress for people and for logs: on a terminal, tqdm's live bar; written to a file or a pipe (a
log, CI), one plain line about every LOG_INTERVAL seconds instead of a redraw per update (a demo's log
held thousands of carriage-return redraws). Every progress bar of the package comes from here."""
from __future__ import annotations

import sys

from tqdm.asyncio import tqdm as asyncio_tqdm
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

LOG_INTERVAL = 10.0  # seconds between the lines written to a file or a pipe
IN_NOTEBOOK = auto_tqdm is not asyncio_tqdm  # tqdm.auto chose Jupyter's widget


class LineProgress(std_tqdm):
    """tqdm writing its status as whole lines, at most one every `mininterval` seconds (at least
    LOG_INTERVAL) and the last state once more when it closes: no carriage returns, no cursor moves."""

    def __init__(self, *args, **kwargs):
        self._line_t = self._line_n = None  # when the last line was written, and at which count
        kwargs["mininterval"] = max(kwargs.get("mininterval") or 0.0, LOG_INTERVAL)
        kwargs["leave"] = False  # close() writes the last line itself
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        # every write goes through here: tqdm's updates, and set_postfix's refresh at each call
        if msg == "":  # tqdm clearing its bar: nothing to clear in a log
            return False
        if self._line_t is not None and self._time() - self._line_t < self.mininterval:
            return False
        self._write_line(msg)
        return True

    def _write_line(self, msg: str | None = None) -> None:
        self._line_t, self._line_n = self._time(), self.n
        self.fp.write((self.__str__() if msg is None else msg).rstrip() + "\n")
        self.fp.flush()

    def moveto(self, n) -> None:
        """No cursor moves in a log (tqdm places nested bars with them)."""

    def close(self) -> None:
        if not getattr(self, "disable", True) and self._line_t is not None and self._line_n != self.n:
            self._write_line()  # the final count, once
        super().close()


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar (same arguments): the live one (tqdm.auto: the notebook's in Jupyter) when its
    stream (`file`, default stderr) is a terminal or a notebook, else a LineProgress."""
    stream = kwargs.get("file") or sys.stderr
    if is_terminal(stream) or IN_NOTEBOOK:
        return auto_tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)
