"""Stopping a command with Ctrl-C (SIGINT) or SIGTERM. The command line turns either into one line
saying how to continue (cli.py); `train` finishes its step and saves a checkpoint first
(StopSignals), so that `--resume` continues from there."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


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
    """Within the block, SIGTERM raises Interrupted as Ctrl-C raises KeyboardInterrupt (files being
    written are cleaned up, the command line prints one line). Outside the main thread: no change."""
    if not _in_main_thread():
        yield
        return

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
