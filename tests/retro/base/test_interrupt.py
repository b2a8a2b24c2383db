"""Ctrl-C (SIGINT) and SIGTERM on `retro train` and `retro build-db`, sent to a real subprocess
once it is working: one line on stderr saying how to continue (no traceback); train saves a
checkpoint first, even before its first --save-every, and --resume continues from it."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest

from tests.helpers.retrieval_helpers import ROOT, quick_database, write_corpus
from retro.app.cli import main
from retro.retrieval import ChunkDatabase

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}
WAIT = 300  # seconds a test waits for a subprocess before killing it (and failing)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return quick_database(tmp_path_factory.mktemp("interrupt"), monkeypatch)


def start(*args: str) -> subprocess.Popen:
    """`python -m retro ARGS`, its output unbuffered (so that its progress lines can be waited for)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "retro", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def signal_after(proc: subprocess.Popen, pattern: str, signum: int) -> tuple[int, str]:
    """Sends `signum` once a line of proc's stdout matches `pattern`; -> (exit status, stderr). The
    process is killed (and the test fails) if that takes more than WAIT seconds."""
    watchdog = threading.Timer(WAIT, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if re.search(pattern, line):
                proc.send_signal(signum)
                break
        else:
            pytest.fail(f"the process ended before printing {pattern!r}: {proc.stderr.read()[-3000:]}")
        _, err = proc.communicate()
    finally:
        watchdog.cancel()
    return proc.returncode, err


def train_args(db, run) -> list[str]:
    args = ["train", "--db", str(db), "--out", str(run), "--steps", "100000", "--batch-size", "2", "--seq-chunks",
            "2", "--warmup", "2", "--device", "cpu", "--no-progress", "--log-every", "1"]
    return args + [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]


def saved_step(run) -> int:
    return json.loads((run / "checkpoint" / "state.json").read_text())["step"]


def logged_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_saves_a_checkpoint_on_ctrl_c_and_sigterm_and_resumes_from_it(db, tmp_path):
    run = tmp_path / "run"
    args = train_args(db, run)
    status, err = signal_after(start(*args), r"\[train\] step 2/", signal.SIGINT)
    assert status == 130 and "Traceback" not in err, err
    step = saved_step(run)  # the default --save-every (200) was never reached: saved on the signal
    assert 2 <= step < 200
    assert err == (f"retro train: interrupted at step {step} of 100000 (checkpoint saved); continue with: "
                   f"retro {shlex.join([*args, '--resume'])}\n"), err
    status, err = signal_after(start(*args, "--resume"), rf"\[train\] step {step + 2}/", signal.SIGTERM)
    assert status == 143 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("retro train: interrupted at step ") and err.rstrip().endswith("--resume"), err
    again = saved_step(run)
    assert again >= step + 2 and logged_steps(run) == list(range(1, again + 1))


def test_build_db_stops_on_ctrl_c_with_the_command_that_resumes_it(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=60, words=2000)
    args = ["build-db", str(corpus), "--out", str(tmp_path / "db"), "--vocab-size", "300", "--chunk-size", "16",
            "--embedder", "bm25", "--valid-fraction", "0.1", "--overwrite"]
    status, err = signal_after(start(*args), r"\[build-db\] \d+ documents", signal.SIGINT)
    assert status == 130 and "Traceback" not in err, err
    resume = [a for a in args if a != "--overwrite"] + ["--resume"]  # --overwrite would start again
    assert err == f"retro build-db: interrupted; continue with: retro {' '.join(resume)}\n", err
    assert (tmp_path / "db" / "build_state.json").exists()
    assert main(resume) == 0
    assert ChunkDatabase(tmp_path / "db").num_chunks > 0


def test_other_commands_stop_with_one_line(monkeypatch, capsys):
    """The demo (whose stages resume when it is run again) names itself as the way on; a command
    that keeps nothing (query) just says it was interrupted; SIGTERM is a stop like Ctrl-C."""
    import time

    import retro.app.demo
    import retro.retrieval

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        pytest.fail("SIGTERM did not stop the command")

    monkeypatch.setattr(retro.app.demo, "run_demo", ctrl_c)
    assert main(["demo", "--steps", "5"]) == 130
    assert capsys.readouterr().err == "retro demo: interrupted; continue with: retro demo --steps 5\n"
    monkeypatch.setattr(retro.app.demo, "run_demo", sigterm)
    assert main(["demo", "--out", "my demo"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == "retro demo: interrupted; continue with: retro demo --out 'my demo'\n"
    monkeypatch.setattr(retro.retrieval.Retriever, "load", ctrl_c)
    assert main(["query", "db", "some text"]) == 130
    assert capsys.readouterr().err == "retro query: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() put the default back


def test_an_error_raised_by_what_ctrl_c_stopped_is_the_interruption(monkeypatch, capsys):
    """A library may catch the KeyboardInterrupt inside its own code and raise an error of its own
    (numpy's file reading turned one into "TypeError: expected str, bytes or os.PathLike object"):
    after a signal, that error is the interruption (one line, 130), not a bug; without a signal an
    error is still a bug (traceback, status 1)."""
    import time

    import retro.app.demo

    def library_swallowing_ctrl_c(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)  # the handler raises before this ends
        except KeyboardInterrupt:
            raise TypeError("expected str, bytes or os.PathLike object, not BufferedReader") from None
        pytest.fail("SIGINT did not stop the command")

    def a_bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(retro.app.demo, "run_demo", library_swallowing_ctrl_c)
    assert main(["demo", "--steps", "5"]) == 130
    assert capsys.readouterr().err == "retro demo: interrupted; continue with: retro demo --steps 5\n"
    monkeypatch.setattr(retro.app.demo, "run_demo", a_bug)  # the earlier command's signal does not count
    assert main(["demo", "--steps", "5"]) == 1
    assert "internal error" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() put the handler back
