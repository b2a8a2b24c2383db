"""Stopping a training run in the tests: in this process through hooks.reached (stop_at), or by a
real SIGKILL of a subprocess (train_killed_at, tests/helpers/train_killed_at.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager

import pytest

from retro.base import hooks
from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT


class Stop(Exception):
    """Raised by stop_at's callback: a run stopped before a step, in this process."""


@contextmanager
def stop_at(step: int):
    """Within it, a train() run stops (raises Stop) before optimizer step `step`."""
    def reached(stage: str, index: int = 0) -> None:
        if stage == "step" and index == step:
            raise Stop(f"stopped before step {step}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hooks, "reached", reached)
        yield


def train_killed_at(step: int, *args: str) -> subprocess.CompletedProcess:
    """`retro train ARGS` in a subprocess that SIGKILLs itself before optimizer step `step`
    (tests/helpers/train_killed_at.py); its stdout and stderr captured."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "train_killed_at.py"), str(step), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
