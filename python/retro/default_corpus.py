"""The demo's default corpus, the same documents on every install: the Python sources of the models
of one pinned `transformers` release, read from that release's wheel, whatever transformers the
environment has installed (a newer one samples other files and gives other numbers).

The wheel is fetched once with pip (`pip download --no-deps`, from the package index pip is set up
for) into the cache folder, its model sources extracted beside it; `scripts/env.sh` does this at
set-up, so the demo itself downloads nothing. Cache folder: $RETRO_CACHE, default
~/.cache/retro-kernels.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import RetroError

PACKAGE, VERSION = "transformers", "5.24.0"
MODELS = f"{PACKAGE}/models/"  # the part of the wheel the corpus is made of


def cache_dir() -> Path:
    return Path(os.environ.get("RETRO_CACHE") or Path.home() / ".cache" / "retro-kernels")


def pinned_wheel() -> Path:
    """The pinned release's wheel in the cache, fetched with pip the first time."""
    folder = cache_dir() / "corpus"
    found = sorted(folder.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"{PACKAGE}=={VERSION}", "--dest", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(f"{PACKAGE}-{VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RetroError(f"the demo's default corpus is {PACKAGE} {VERSION}'s model sources, and fetching its "
                             f"wheel failed ({' '.join(cmd[2:])}: {proc.stderr.strip()[-300:]}); put the wheel in "
                             f"{folder} or pass --corpus DIR")
        os.replace(wheels[0], folder / wheels[0].name)  # whole or absent: a cut download leaves nothing
    return folder / wheels[0].name


def default_corpus() -> str:
    """The folder of the pinned release's model sources (transformers/models/...), extracted from
    its wheel once (into a temporary folder, renamed when complete)."""
    root = cache_dir() / "corpus" / f"{PACKAGE}-{VERSION}"
    if not root.is_dir():
        wheel = pinned_wheel()
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(tmp, [n for n in z.namelist() if n.startswith(MODELS) and n.endswith(".py")])
            try:
                os.replace(tmp, root)
            except OSError:
                if not root.is_dir():  # not another process that extracted it first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(root / MODELS)


def describe() -> str:
    return f"the model sources of {PACKAGE} {VERSION} (pinned)"
