"""kill -9 at any stage of `build-db` (and of the neighbours that follow it), then --resume: the
database is byte for byte the one an uninterrupted build writes; with an embedder and with BM25."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT, database_contents

WORKER = ROOT / "tests" / "helpers" / "build_kill_worker.py"
# (stage, unit after which the build is killed): every stage of build.py, and the neighbours
KILLS = [("catalogue", 0), ("tokenizer", 0), ("tokenise", 1), ("embed", 2), ("merge", 3), ("index", 0),
         ("manifest", 0), ("neighbours", 1)]
# --embedder bm25: its own stages (terms, index) in place of embed, merge and the faiss index
BM25_KILLS = [("terms", 2), ("index", 0), ("manifest", 0), ("neighbours", 1)]


def write_folders(root: Path, folders: int = 5, files: int = 3) -> Path:
    """Folders of text files whose lines share words within a folder."""
    import numpy as np

    rng = np.random.default_rng(0)
    for f in range(folders):
        words = [f"f{f}w{i}" for i in range(12)] + ["alpha", "beta", "gamma", "delta"]
        for i in range(files):
            lines = [" ".join(rng.choice(words, size=9)) for _ in range(30 + 7 * i)]
            path = root / f"pkg{f}" / f"file{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(lines) + "\n")
    return root


def run_worker(corpus, out, stage="none", index=0, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), str(corpus), str(out), stage, str(index), *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_folders(tmp_path_factory.mktemp("build") / "corpus")


def uninterrupted_build(corpus, out, *flags) -> dict:
    done = run_worker(corpus, out, "none", 0, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    return database_contents(out)


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    return corpus, uninterrupted_build(corpus, tmp_path_factory.mktemp("db") / "db")


@pytest.fixture(scope="module")
def uninterrupted_bm25(corpus, tmp_path_factory):
    return corpus, uninterrupted_build(corpus, tmp_path_factory.mktemp("db-bm25") / "db", "--bm25")


def kill_then_resume(tmp_path, corpus, want, stage, index, *flags) -> None:
    killed = run_worker(corpus, tmp_path / "db", stage, index, *flags)
    assert killed.returncode == -9, (stage, killed.returncode, killed.stderr[-2000:])
    if stage != "neighbours":
        assert not (tmp_path / "db" / "manifest.json").exists() or stage == "manifest"
    resumed = run_worker(corpus, tmp_path / "db", "none", 0, "--resume", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = database_contents(tmp_path / "db")
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


@pytest.mark.slow
@pytest.mark.parametrize("stage,index", KILLS)
def test_kill_9_then_resume_gives_the_uninterrupted_database(tmp_path, uninterrupted, stage, index):
    kill_then_resume(tmp_path, *uninterrupted, stage, index)


@pytest.mark.slow
@pytest.mark.parametrize("stage,index", BM25_KILLS)
def test_kill_9_then_resume_gives_the_uninterrupted_bm25_database(tmp_path, uninterrupted_bm25, stage, index):
    assert "bm25/data.npy" in uninterrupted_bm25[1] and "embeddings.npy" not in uninterrupted_bm25[1]
    kill_then_resume(tmp_path, *uninterrupted_bm25, stage, index, "--bm25")


def test_an_unfinished_build_is_named_and_resumed_only_with_its_options(tmp_path, uninterrupted, monkeypatch):
    import retro.retrieval.embedder
    from tests.helpers.retrieval_helpers import HashingEmbedder
    from retro import RetroError
    from retro.retrieval import BuildOptions, ChunkDatabase, build_database

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)

    corpus, _ = uninterrupted
    assert run_worker(corpus, tmp_path / "db", "embed", 1).returncode == -9
    with pytest.raises(RetroError, match="unfinished build.*--resume"):
        ChunkDatabase(tmp_path / "db")
    opts = dict(corpus=str(corpus), out=str(tmp_path / "db"), vocab_size=300, chunk_size=16, block_size=16,
                valid_fraction=0.2, holdout_by="both", progress=False, embedder="hashing-test-embedder")
    with pytest.raises(RetroError, match="unfinished build; pass --resume"):
        build_database(BuildOptions(**opts), log=lambda *_: None)
    with pytest.raises(RetroError, match=r"options differ.*'chunk_size': \(16, 8\)"):
        build_database(BuildOptions(**{**opts, "chunk_size": 8, "resume": True}), log=lambda *_: None)
