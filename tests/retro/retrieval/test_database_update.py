"""A database that grows (update.py, compact.py, generations.py): add-documents appends to every index kind,
remove-documents hides documents for good, compact gives what a fresh build of the rest gives; own
document exclusion and the 13-gram filter keep working; a reader keeps its generation until it
reloads; kill -9 mid-add leaves the old generation and --resume completes it; a second writer is
refused; bad input gets one line and loses nothing; a run still loads against its grown database."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import retro.retrieval.embedder
from tests.helpers.retrieval_helpers import ROOT, WORDS, HashingEmbedder, database_files, quick_database, write_corpus
from retro import RetroError, add_documents, compact, remove_documents
from retro.app.cli import main
from retro.app.demo.corpus import near_duplicated
from retro.retrieval import BuildOptions, ChunkDatabase, Retriever, build_database
from retro.retrieval.database import ARRAYS, chunk_texts
from retro.retrieval.generations import ConcatArray

QUIET = lambda *_: None  # noqa: E731
NEW_DOCS = 3
KILL_WORKER = ROOT / "tests" / "helpers" / "update_kill_worker.py"


class WideHashingEmbedder(HashingEmbedder):
    """The tests' hashing embedder with buckets enough that chunks of a few words rarely share a key."""

    dim = 1024


@pytest.fixture(autouse=True)
def hashing_embedder(monkeypatch):
    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", WideHashingEmbedder)


BUILD = dict(vocab_size=300, chunk_size=16, block_size=64, valid_fraction=0.2, progress=False, index="flat",
             embedder="hashing-test-embedder")


def build(out: Path, corpus: Path, index: str = "flat", valid: float = 0.2, **extra) -> Path:
    bm25 = index == "bm25"
    opts = dict(BUILD, corpus=str(corpus), out=str(out), valid_fraction=valid, index="auto" if bm25 else index,
                embedder="bm25" if bm25 else BUILD["embedder"])
    build_database(BuildOptions(**{**opts, **extra}), log=QUIET)
    return out


def new_corpus(folder: Path, docs: int = NEW_DOCS) -> Path:
    """Documents of the built ones' words and a word of their own (so their chunks are new to the database)."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        pool = [f"fresh{d}"] * 4 + WORDS[:12]
        (folder / f"new{d}.txt").write_text("\n".join(" ".join(rng.choice(pool, 9)) for _ in range(12)) + "\n")
    return folder


def texts_of(db: ChunkDatabase, ids) -> list[str]:
    return chunk_texts(db.tokenizer, db.tokens, db.chunk_start[ids], db.chunk_len[ids])


def files(db: Path) -> dict:
    """database_files without the writer's lock file (it holds the last writer's pid)."""
    return {k: v for k, v in database_files(db).items() if k != ".writer.lock"}


@pytest.mark.parametrize("shape", [(), (3,)])
def test_concatenated_segments_index_as_one_numpy_array(shape):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, *shape)).astype(np.float32) for n in (5, 1, 7)]
    whole, joined = np.concatenate(parts), ConcatArray(parts)
    assert joined.shape == whole.shape and len(joined) == 13 and joined.dtype == whole.dtype
    for key in (slice(0, 5), slice(2, 9), slice(5, 6), slice(4, 4), slice(None), slice(1, 12, 3), slice(-3, None),
                0, 5, 12, -1, np.int64(6), np.array([12, 0, 5, 5, 7]), np.array([[1, 6], [11, 2]]),
                np.arange(13) % 3 == 0, []):
        np.testing.assert_array_equal(joined[key], whole[key], str(key))
    np.testing.assert_array_equal(np.asarray(joined), whole)
    assert np.asarray(joined, dtype=np.float64).dtype == np.float64
    with pytest.raises(IndexError):
        joined[13]
    with pytest.raises(IndexError):
        joined[np.array([0, 13])]


@pytest.mark.parametrize("kind", ["flat", "ivf-flat", "ivf-fastscan", "torch", "bm25"])
def test_added_documents_are_found_by_every_index_kind(tmp_path, kind):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8), kind)
    before = ChunkDatabase(db)
    grown = add_documents(db, new_corpus(tmp_path / "c2"), log=QUIET)
    assert grown.generation == 1 and len(grown.doc_split) == len(before.doc_split) + NEW_DOCS
    new = np.arange(before.num_chunks, grown.num_chunks)
    assert len(new) > 0 and set(grown.chunk_doc[new]) == set(range(len(before.doc_split), len(grown.doc_split)))
    res = Retriever.load(db).search(texts_of(grown, new), 1)
    assert (grown.chunk_doc[res.ids[:, 0]] >= len(before.doc_split)).all()  # an added document's chunk
    if kind != "bm25":  # a chunk's own text finds its key
        np.testing.assert_allclose(res.distances[:, 0], 0, atol=1e-4)
        np.testing.assert_array_equal(res.tokens[:, 0, :16], grown.values(new)[0][:, :16])


@pytest.mark.parametrize("kind", ["flat", "bm25"])
def test_removed_documents_are_never_returned_and_compact_equals_a_fresh_build(tmp_path, kind):
    write_corpus(tmp_path / "c1" / "a", docs=6)
    db = build(tmp_path / "db", tmp_path / "c1", kind, valid=0.0)
    grown = add_documents(db, new_corpus(tmp_path / "c2" / "b"), log=QUIET)
    everything = np.arange(grown.num_chunks)
    queries = texts_of(grown, everything)
    gone = {1, 3, 7}  # two built documents (one by path) and an added one
    found = Retriever.load(db).search(queries, 4).ids
    assert set(grown.chunk_doc[found[found >= 0]]) >= gone  # they are found before they are removed
    remove_documents(db, ids=[1, 7], log=QUIET)
    remove_documents(db, paths=["a/doc003.txt"], log=QUIET)
    r = Retriever.load(db)
    assert r.db.generation == 3 and set(r.db.removed.tolist()) == gone
    for res in (r.search(queries, 4), r.search(queries, 4, exclude_doc_ids=grown.chunk_doc),
                r.search(queries, 4, allowed_chunks=everything)):
        assert (res.ids >= 0).any() and not set(grown.chunk_doc[res.ids[res.ids >= 0]]) & gone
    assert not set(r.db.documents("train").tolist()) & gone

    compact(db, log=QUIET)
    fresh_corpus = tmp_path / "c3"
    for d in sorted({0, 1, 2, 3, 4, 5} - gone):
        (fresh_corpus / "a").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "c1" / "a" / f"doc{d:03d}.txt", fresh_corpus / "a")
    for d in sorted({0, 1, 2} - {g - 6 for g in gone}):
        (fresh_corpus / "b").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "c2" / "b" / f"new{d}.txt", fresh_corpus / "b")
    fresh = build(tmp_path / "fresh", fresh_corpus, kind, valid=0.0, tokenizer=str(db / "tokenizer.model"))
    mine, theirs = ChunkDatabase(db), ChunkDatabase(fresh)
    assert mine.generation == 4 and not len(mine.removed) and mine.manifest["index"] == theirs.manifest["index"]
    for name in ARRAYS if kind != "bm25" else ARRAYS[:-1]:
        np.testing.assert_array_equal(np.asarray(getattr(mine, name)), np.asarray(getattr(theirs, name)), name)
    queries = texts_of(theirs, np.arange(theirs.num_chunks))
    a, b = Retriever.load(db).search(queries, 4), Retriever.load(fresh).search(queries, 4)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.distances, b.distances)


def test_own_document_exclusion_and_the_13gram_filter_on_the_grown_database(tmp_path):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=10))
    base = ChunkDatabase(db)
    valid = base.documents("valid")
    assert len(valid) and near_duplicated(base, valid) == set()
    corpus = new_corpus(tmp_path / "c2")
    (corpus / "a-copy.txt").write_text(base.tokenizer.decode(base.document_tokens(int(valid[0]))))  # a leak
    grown = add_documents(db, corpus, log=QUIET)
    copy_id = len(base.doc_split)  # a-copy.txt sorts first
    assert near_duplicated(grown, valid) == {int(valid[0])}
    new = np.arange(base.num_chunks, grown.num_chunks)
    r = Retriever.load(db)
    own, _ = r.search_chunks(new, 4)
    assert (grown.chunk_doc[own[:, 0]] == grown.chunk_doc[new]).all()  # each finds itself without the exclusion
    ids, _ = r.search_chunks(new, 4, exclude_doc_ids=grown.chunk_doc[new])
    assert (ids >= 0).all() and (grown.chunk_doc[ids] != grown.chunk_doc[new][:, None]).all()
    after = remove_documents(db, ids=[copy_id], log=QUIET)
    assert near_duplicated(after, valid) == set()


def test_a_reader_keeps_its_generation_until_it_reloads(tmp_path):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8))
    reader = Retriever.load(db)
    n = reader.db.num_chunks
    queries = texts_of(reader.db, np.arange(0, n, 7))
    want = reader.search(queries, 3)
    grown = add_documents(db, new_corpus(tmp_path / "c2"), log=QUIET)
    assert grown.num_chunks > n and reader.db.num_chunks == n and not reader.db.is_current()
    held = reader.search(queries + texts_of(grown, np.arange(n, grown.num_chunks)), 3)
    assert (held.ids < n).all()  # the old generation: none of the new chunks
    remove_documents(db, ids=[0], log=QUIET)
    compact(db, log=QUIET)  # deletes the files of the generations before
    assert not (db / "embeddings.npy").exists() and not (db / "index.faiss").exists()
    again = reader.search(queries, 3)
    np.testing.assert_array_equal(again.ids, want.ids)
    np.testing.assert_array_equal(again.tokens, want.tokens)
    reloaded = Retriever.load(db)
    assert reloaded.db.is_current() and reloaded.db.generation == 3
    assert reloaded.db.num_chunks == grown.num_chunks - int((grown.chunk_doc == 0).sum())


def test_a_reader_that_opens_during_a_compact_gets_the_new_generation(tmp_path, monkeypatch):
    import retro.retrieval.database as database

    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8))
    remove_documents(db, ids=[0], log=QUIET)
    stale = json.loads((db / "manifest.json").read_text())
    compact(db, log=QUIET)  # deletes generation 1's files
    # the reader read the manifest just before the switch, and opens the files just after the deletion
    reads = iter([stale])
    real = database.read_json
    monkeypatch.setattr(database, "read_json", lambda path: next(reads, None) or real(path))
    r = Retriever.load(db)
    assert r.db.generation == 2 and r.search(["alpha beta"], 2).ids.shape == (1, 2)


def _run_killed(*argv) -> subprocess.CompletedProcess:
    """update_kill_worker.py ARGV (add DB STAGE CORPUS, or compact DB STAGE), which kills itself."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(KILL_WORKER), *map(str, argv)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("stage", ["tokenise", "index", "manifest"])
def test_kill_9_during_an_add_leaves_the_old_generation_and_resume_completes_it(tmp_path, stage):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8))
    corpus = new_corpus(tmp_path / "c2")
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    add_documents(reference, corpus, log=QUIET)
    before = files(db)
    proc = _run_killed("add", db, stage, corpus)
    assert proc.returncode == -9, proc.stderr
    if stage == "manifest":  # killed after the switch: the add is in, only the clean-up is left
        assert ChunkDatabase(db).generation == 1
    else:
        assert ChunkDatabase(db).generation == 0
        assert {k: v for k, v in files(db).items() if not k.startswith("generations/")} == before
        assert Retriever.load(db).search(["alpha beta"], 2).ids.shape == (1, 2)
        with pytest.raises(RetroError, match="pass --resume to complete it"):
            add_documents(db, corpus, log=QUIET)
    add_documents(db, corpus, resume=True, log=QUIET)
    mine, theirs = files(db), files(reference)
    assert json.loads(mine.pop("manifest.json")) == json.loads(theirs.pop("manifest.json"))
    assert mine == theirs
    add_documents(db, corpus, resume=True, log=QUIET)  # complete: nothing to resume, nothing added twice
    assert ChunkDatabase(db).generation == 1


@pytest.mark.parametrize("stage", ["arrays", "manifest"])
def test_kill_9_during_a_compact_leaves_the_old_generation_and_compact_completes_it(tmp_path, stage):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8))
    add_documents(db, new_corpus(tmp_path / "c2"), log=QUIET)
    remove_documents(db, ids=[2, 9], log=QUIET)
    reference = tmp_path / "reference"
    shutil.copytree(db, reference)
    compact(reference, log=QUIET)
    before = files(db)
    assert _run_killed("compact", db, stage).returncode == -9
    if stage == "arrays":
        assert ChunkDatabase(db).generation == 2
        assert {k: v for k, v in files(db).items() if not k.startswith("generations/000003")} == before
        assert Retriever.load(db).search(["alpha beta"], 2).ids.shape == (1, 2)
    compact(db, log=QUIET)
    mine, theirs = files(db), files(reference)
    assert json.loads(mine.pop("manifest.json")) == json.loads(theirs.pop("manifest.json"))
    assert mine == theirs


def test_build_db_resume_and_overwrite_know_a_grown_database(tmp_path):
    from retro.retrieval import compute_neighbours

    corpus = write_corpus(tmp_path / "c1", docs=8)
    db = build(tmp_path / "db", corpus)
    add_documents(db, new_corpus(tmp_path / "c2"), log=QUIET)
    compute_neighbours(db, k=2, extra=1, progress=False, log=QUIET)
    assert (db / "neighbours-3-gen000001.npy").exists()
    logs = []
    build_database(BuildOptions(**{**BUILD, "corpus": str(corpus), "out": str(db), "resume": True}), log=logs.append)
    assert any("nothing to resume" in line for line in logs) and ChunkDatabase(db).generation == 1
    (db / "generations" / "000001" / "index.faiss").write_bytes(b"cut short")
    with pytest.raises(RetroError, match="is damaged .*; run `retro compact"):
        Retriever.load(db)
    with pytest.raises(RetroError, match="changed after its build .*: run `retro compact"):
        build_database(BuildOptions(**{**BUILD, "corpus": str(corpus), "out": str(db), "resume": True}), log=QUIET)
    compact(db, log=QUIET)  # two segments: written again as one, its index afresh
    assert Retriever.load(db).db.generation == 2
    (db / ChunkDatabase(db).manifest["index_file"]).unlink()
    compact(db, log=QUIET)  # nothing removed, one segment, but no index: built afresh
    assert Retriever.load(db).db.generation == 3
    build_database(BuildOptions(**{**BUILD, "corpus": str(corpus), "out": str(db), "overwrite": True}), log=QUIET)
    assert ChunkDatabase(db).generation == 0 and sorted(p.name for p in db.iterdir() if "neighbours" in p.name) == []


def test_a_second_writer_is_refused_with_one_line(tmp_path, capsys):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8))
    corpus = new_corpus(tmp_path / "c2")
    holder = subprocess.Popen(  # an add that waits after embedding, holding the lock
        [sys.executable, str(KILL_WORKER), "add", str(db), "pause:embed", str(corpus)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}"})
    try:
        assert holder.stdout.readline().strip() == "paused"
        before = files(db)
        for argv in (["add-documents", str(db), str(corpus)], ["remove-documents", str(db), "--id", "0"],
                     ["compact", str(db)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"being changed by another process (pid {holder.pid})" in err, err
        assert files(db) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["add-documents", str(db), str(corpus), "--resume"]) == 0  # the lock went with its process
    assert ChunkDatabase(db).generation == 1


def test_bad_input_gets_one_line_and_loses_nothing(tmp_path, capsys):
    db = build(tmp_path / "db", write_corpus(tmp_path / "c1", docs=8))
    corpus = new_corpus(tmp_path / "c2")
    old = tmp_path / "old"
    shutil.copytree(db, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("  \n\n")
    sharded = build(tmp_path / "sharded", tmp_path / "c1", shards=2)
    before, before_old = files(db), files(old)
    cases = [(["add-documents", str(tmp_path / "nope"), str(corpus)], "does not exist; build it first"),
             (["add-documents", str(old), str(corpus)], "has database format version 1"),
             (["add-documents", str(db), str(empty)], "has no non-empty document to add"),
             (["add-documents", str(db), str(tmp_path / "no-corpus")], "does not exist; expected a text file"),
             (["remove-documents", str(db), "--id", "999"], "--id 999: no such document"),
             (["remove-documents", str(db), "--id", "two"], "--id takes document ids (integers), got 'two'"),
             (["remove-documents", str(db), "--path", "nothing*.txt"], "no document of"),
             (["remove-documents", str(db)], "needs --id ID or --path GLOB"),
             (["remove-documents", str(db), "--path", ""], "--path takes non-empty glob patterns, got ('',)"),
             (["add-documents", str(db), str(corpus), "--resume"], "holds no unfinished add-documents"),
             (["add-documents", str(sharded), str(corpus)], "has a sharded index"),
             (["compact", str(tmp_path / "nope")], "does not exist")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, (argv, err)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError, as where it is missing
        for argv in (["add-documents", str(db), str(corpus)], ["compact", str(db)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "faiss is not installed here: install faiss-cpu" in err, err
    assert files(db) == before and files(old) == before_old and not (db / "generations").exists()
    assert main(["remove-documents", str(db), "--id", "0"]) == 0
    assert main(["remove-documents", str(db), "--id", "0"]) == 2  # removed already: not there any more
    assert "--id 0: no such document" in capsys.readouterr().err


SMALL = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
         "depth": 2, "cca_layers": [1]}


def test_a_run_still_loads_after_an_add_and_another_tokenizer_is_refused(tmp_path, monkeypatch, capsys):
    from retro.training.train import TrainOptions, load_model, train

    db = quick_database(tmp_path / "a", monkeypatch)
    run = train(TrainOptions(db=str(db), out=str(tmp_path / "run"), steps=2, batch_size=2, seq_chunks=4, warmup=1,
                             k=1, overrides=dict(SMALL), progress=False, device="cpu"), log=QUIET)
    add_documents(db, new_corpus(tmp_path / "c2"), log=QUIET)
    remove_documents(db, ids=[0], log=QUIET)
    load_model(run, db=ChunkDatabase(db))  # no error: the database it was trained on, grown
    assert main(["evaluate", str(run), "--db", str(db), "--max-documents", "1"]) == 0
    capsys.readouterr()
    with pytest.raises(RetroError, match="removed documents: run `retro compact"):
        train(TrainOptions(db=str(db), out=str(tmp_path / "run2"), steps=1, progress=False), log=QUIET)
    assert (db / "neighbours-8.npy").exists()  # generation 0's, which compact deletes
    compact(db, log=QUIET)
    assert not list(db.glob("neighbours-*"))
    load_model(run, db=ChunkDatabase(db))  # and after compact
    grown_run = train(TrainOptions(db=str(db), out=str(tmp_path / "run2"), steps=2, batch_size=2, seq_chunks=4,
                                   warmup=1, k=1, overrides=dict(SMALL), progress=False, device="cpu"), log=QUIET)
    assert list(db.glob("neighbours-*-gen000003.npy"))  # the neighbours of the generation trained on
    load_model(grown_run, db=ChunkDatabase(db))
    other = build(tmp_path / "other", tmp_path / "a" / "corpus", vocab_size=200)
    add_documents(other, new_corpus(tmp_path / "c3"), log=QUIET)
    with pytest.raises(RetroError, match="another tokenizer"):
        load_model(run, db=ChunkDatabase(other))
    assert main(["evaluate", str(run), "--db", str(other)]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    other_keys = build(tmp_path / "keys", tmp_path / "a" / "corpus", "bm25", tokenizer=str(db / "tokenizer.model"))
    add_documents(other_keys, new_corpus(tmp_path / "c4"), log=QUIET)
    with pytest.raises(RetroError, match="other keys"):
        load_model(run, db=ChunkDatabase(other_keys))
