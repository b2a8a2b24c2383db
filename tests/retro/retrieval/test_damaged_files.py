"""Damaged files: a truncated or overwritten checkpoint file (model.safetensors, optimizer.pt,
config.json, state.json), a missing state.json, a truncated index.faiss. Each command that reads one
ends as one line naming the file and what to do (status 2), never as an internal error's traceback;
`build-db --resume` rebuilds a missing or damaged index of a finished database."""
import shutil

import pytest

from tests.helpers.retrieval_helpers import HashingEmbedder, quick_database
from retro.app.cli import main

SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}
TRAIN = ["train", "--db", "{w}/db", "--out", "{w}/run", "--steps", "2", "--batch-size", "2", "--seq-chunks", "2",
         "--warmup", "1", "--device", "cpu", "--no-progress"] + \
    [x for k, v in SMALL.items() for x in ("--set", f"{k}={v}".replace(" ", ""))]
RESUME = TRAIN + ["--resume"]
GENERATE = ["generate", "{w}/run", "alpha beta", "--db", "{w}/db", "--max-new-tokens", "2", "--device", "cpu"]
EVALUATE = ["evaluate", "{w}/run", "--db", "{w}/db", "--device", "cpu", "--max-documents", "1"]
QUERY = ["query", "{w}/db", "alpha beta"]
CK = "run/checkpoint/"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A database (hashing embedder) and a run of 2 steps trained on it."""
    root = tmp_path_factory.mktemp("damaged")
    with pytest.MonkeyPatch.context() as monkeypatch:
        quick_database(root, monkeypatch)
    assert main([a.replace("{w}", str(root)) for a in TRAIN]) == 0
    return root


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def overwrite(path):
    path.write_bytes(b"\x00not what it should be\n" * 40)


def remove(path):
    path.unlink()


# (file, how it is damaged, the commands that read it, what the one line says besides its name)
DAMAGES = [
    (CK + "model.safetensors", (truncate, overwrite), (GENERATE, EVALUATE, RESUME), "is damaged"),
    (CK + "optimizer.pt", (truncate, overwrite), (RESUME,), "is damaged"),
    (CK + "optimizer.pt", (remove,), (RESUME,), "is missing"),
    (CK + "config.json", (truncate,), (GENERATE, RESUME), "is damaged"),
    (CK + "state.json", (truncate,), (EVALUATE, RESUME), "is damaged"),
    (CK + "state.json", (remove,), (GENERATE, RESUME), "is missing"),
    ("db/index.faiss", (truncate, overwrite, remove), (QUERY, GENERATE), "--resume"),
]
CASES = [(damage, name, argv, says) for name, damages, commands, says in DAMAGES for damage in damages
         for argv in commands]


@pytest.mark.parametrize("damage,name,argv,says", CASES,
                         ids=[f"{d.__name__}-{n.split('/')[-1]}-{a[0]}" for d, n, a, _ in CASES])
def test_a_damaged_file_is_one_line_naming_it(built, tmp_path, monkeypatch, capsys, damage, name, argv, says):
    import retro.retrieval.embedder

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)
    for folder in ("db", "run"):
        shutil.copytree(built / folder, tmp_path / folder)
    damage(tmp_path / name)
    capsys.readouterr()
    status = main([a.replace("{w}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"retro {argv[0]}: error: ") and str(tmp_path / name) in err and says in err, err
    assert "holds no checkpoint" not in err and "refusing" not in err, err


@pytest.mark.parametrize("damage", [truncate, remove])
def test_build_db_resume_rebuilds_a_damaged_index(built, tmp_path, monkeypatch, damage):
    """A finished database whose index.faiss was cut short or deleted: `build-db --resume` (same
    options) writes the index again, byte for byte the one the build wrote."""
    import retro.retrieval.embedder
    from retro.retrieval import BuildOptions, Retriever, build_database

    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)
    shutil.copytree(built / "db", tmp_path / "db")
    index = tmp_path / "db" / "index.faiss"
    want = index.read_bytes()
    damage(index)
    said = []
    build_database(BuildOptions(corpus=str(built / "corpus"), out=str(tmp_path / "db"), vocab_size=300, chunk_size=16,
                                block_size=256, valid_fraction=0.2, progress=False, embedder="hashing-test-embedder",
                                resume=True), log=said.append)
    assert index.read_bytes() == want and any("index.faiss" in line for line in said), said
    assert Retriever.load(tmp_path / "db").search(["alpha beta"], 2).ids.shape == (1, 2)
    assert not (tmp_path / "db" / "build_state.json").exists()
