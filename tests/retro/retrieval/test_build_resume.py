"""kill -9 at any stage of `build-db` (and of the neighbours that follow it), then --resume: the
database is byte for byte the one an uninterrupted build writes; with an embedder and with BM25.
Under torchrun with 2 processes (gloo): the database is the one-process one, and after rank 1 alone
is killed in a stage, the same command with --resume completes it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT, database_contents, free_port

WORKER = ROOT / "tests" / "helpers" / "build_kill_worker.py"
# (stage, unit after which the build is killed): every stage of build.py, and the neighbours
KILLS = [("catalogue", 0), ("tokenizer", 0), ("tokenise", 1), ("embed", 2), ("merge", 3), ("index-part", 2),
         ("index", 0), ("manifest", 0), ("neighbours", 1)]
# under torchrun, rank 1 killed after its first unit of each stage the ranks share
RANK_KILLS = [("embed", 1, 1), ("index-part", 1, 1), ("neighbours", 1, 1),
              # rank 0 too: in a stage it runs alone (the others wait at a barrier) and in shared ones
              ("merge", 1, 0), ("index-part", 0, 0), ("neighbours", 0, 0)]
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


def run_worker(corpus, out, stage="none", index=0, *flags, processes: int = 0,
               kill_rank: int = 1) -> subprocess.CompletedProcess:
    """The worker alone, or with processes > 0 under torchrun, where rank kill_rank is the one it kills."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "OMP_NUM_THREADS": "1",
           **({"KILL_RANK": str(kill_rank)} if processes else {})}
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                  "--master_port", str(free_port())] if processes else [])
    return subprocess.run([*launch, str(WORKER), str(corpus), str(out), stage, str(index), *flags],
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


def kill_then_resume(tmp_path, corpus, want, stage, index, *flags, processes: int = 0, kill_rank: int = 1) -> None:
    killed = run_worker(corpus, tmp_path / "db", stage, index, *flags, processes=processes, kill_rank=kill_rank)
    # torchrun ends the other ranks when one dies and exits with 1
    assert killed.returncode == (1 if processes else -9), (stage, killed.returncode, killed.stderr[-2000:])
    assert not processes or "Signal 9 (SIGKILL) received" in killed.stderr, killed.stderr[-2000:]
    if stage != "neighbours":
        assert not (tmp_path / "db" / "manifest.json").exists() or stage == "manifest"
    resumed = run_worker(corpus, tmp_path / "db", "none", 0, "--resume", *flags, processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_database(tmp_path / "db", want)


def assert_same_database(path, want: dict) -> None:
    got = database_contents(path)
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


@pytest.mark.slow
def test_two_processes_build_the_one_process_database(tmp_path, uninterrupted):
    """Every file, the index and the neighbours included, byte for byte."""
    corpus, want = uninterrupted
    assert "index.faiss" in want and "neighbours-4.npy" in want
    done = run_worker(corpus, tmp_path / "db", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_database(tmp_path / "db", want)


@pytest.mark.slow
@pytest.mark.parametrize("stage,index,rank", RANK_KILLS)
def test_one_rank_killed_then_resume_gives_the_one_process_database(tmp_path, uninterrupted, stage, index, rank):
    kill_then_resume(tmp_path, *uninterrupted, stage, index, processes=2, kill_rank=rank)


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
