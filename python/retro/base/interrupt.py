"""Stopping a command with Ctrl-C (SIGINT) or SIGTERM. The command line turns either into one line
saying how to continue (cli.py); `train` finishes its step and saves a checkpoint first
(StopSignals), so that `--resume` continues from there."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


_received: list[int] = []  # the signals that stopped (or began to stop) this process's command


def received_signal() -> int | None:
    """The signal that began to stop the command, if one came: an error raised after it (a library
    that caught the KeyboardInterrupt in its C code and raised an error of its own, as numpy's file
    reading can) is the interruption, not a bug."""
    return _received[-1] if _received else None


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command; `done` says what was kept before it stopped (e.g.
    "at step 40 (checkpoint saved)"). The exit status is 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT, done: str = ""):
        super().__init__(done or signal.Signals(signum).name)
        self.signum, self.done = int(signum), done

    @property
    def status(self) -> int:
        return 128 + self.signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM and Ctrl-C (SIGINT) raise Interrupted, a KeyboardInterrupt that
    records the signal (files being written are cleaned up, the command line prints one line).
    Outside the main thread: no change."""
    if not _in_main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        _received.append(signum)
        raise Interrupted(signum)

    _received.clear()  # a command's own signals only
    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGINT and SIGTERM do not stop the process but set
    stop.signum, which a loop checks between units of work (train: between steps, to save a
    checkpoint before it stops). A second signal stops at once (Interrupted). Outside the main
    thread signals cannot be caught: nothing changes."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        _received.append(signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignals":
        if _in_main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
