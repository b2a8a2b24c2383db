"""The retrieval database: corpus reading, tokenizer, chunking, build (resume, overwrite,
distributed), faults, search with same-document exclusion, neighbours, the command line."""
import gzip
import json
import re
import shutil

import numpy as np
import pytest

from tests.helpers.retrieval_helpers import build_args, run_cli, write_corpus
from retro import RetroError
from retro.retrieval import (BuildOptions, ChunkDatabase, CorpusReport, Retriever, SentencePieceTokenizer,
                             build_database, compute_neighbours, iter_documents, load_neighbours)
from retro.retrieval.database import chunk_layout
from retro.retrieval.embedder import default_embedder


def options(corpus, out, **kw):
    base = dict(vocab_size=300, chunk_size=16, block_size=64, valid_fraction=0.2, progress=False)
    base.update(kw)
    return BuildOptions(corpus=str(corpus), out=str(out), **base)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    corpus = write_corpus(root / "corpus")
    build_database(options(corpus, root / "db"), log=lambda *_: None)
    return root / "db"


# ---- corpus and tokenizer -----------------------------------------------------------------------


def test_corpus_kinds_and_non_utf8(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok\n\xff\xfe end")  # latin-1 bytes, not UTF-8
    (tmp_path / "b.md").write_text("second document")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    report = CorpusReport()
    docs = list(iter_documents(tmp_path, report=report))
    assert docs == ["caf\ufffd ok\n\ufffd\ufffd end", "second document"]
    assert report.replaced_bytes == 3 and report.empty_documents == 1 and report.files == 3

    lines = [json.dumps({"text": "one"}), "", json.dumps({"body": "two", "text": "x"})]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "zipped"}) + "\n")
    assert list(iter_documents(tmp_path / "c.jsonl")) == ["one", "x"]
    assert list(iter_documents(tmp_path / "d.jsonl.gz", text_field="body")) == ["zipped"]
    with pytest.raises(RetroError, match="no field 'text'.*--text-field"):
        list(iter_documents(tmp_path / "d.jsonl.gz"))


def test_corpus_errors(tmp_path):
    with pytest.raises(RetroError, match="does not exist"):
        list(iter_documents(tmp_path / "missing"))
    (tmp_path / "dir.txt").mkdir()
    (tmp_path / "dir.txt" / "x.py").write_text("x = 1")
    # a folder named like a text file is a folder: its files are read, it is not opened as a file
    assert list(iter_documents(tmp_path / "dir.txt")) == ["x = 1"]
    assert list(iter_documents(tmp_path, with_source=True)) == [("x = 1", "dir.txt", "dir.txt/x.py")]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(RetroError, match="line 1 is not JSON"):
        list(iter_documents(tmp_path / "bad.jsonl"))


def test_tokenizer_reduces_too_large_vocabulary_and_round_trips(tmp_path):
    logs = []
    docs = list(iter_documents(write_corpus(tmp_path / "c", docs=3)))
    tok = SentencePieceTokenizer.train(docs, vocab_size=50_000, log=logs.append)
    assert tok.vocab_size < 50_000 and "reduced" in logs[0]
    assert tok.decode(tok.encode([docs[0]])[0]) == docs[0]
    run_cli("tokenizer", str(tmp_path / "c"), "--vocab-size", "320", "--out", str(tmp_path / "t.model"))
    assert SentencePieceTokenizer.load(tmp_path / "t.model").vocab_size == 320
    small = SentencePieceTokenizer.train(docs, vocab_size=100, log=logs.append)
    assert "too small" in logs[-1] and small.vocab_size > 256


def test_chunks_never_cross_documents():
    doc_start = np.array([0, 5, 5, 21, 40])
    split = np.array([0, 0, 0, 1], dtype=np.uint8)  # the last document is held out
    start, length, doc = chunk_layout(doc_start, split, 8)
    assert start.tolist() == [0, 5, 13] and length.tolist() == [5, 8, 8] and doc.tolist() == [0, 2, 2]


# ---- the database ------------------------------------------------------------------------------


def test_database_layout(db):
    d = ChunkDatabase(db)
    m = d.manifest
    assert m["format_version"] == 2 and m["chunk_size"] == 16
    assert m["counts"]["valid_documents"] == 2 and m["counts"]["train_documents"] == 10
    assert m["embedder"]["name"] == default_embedder()[0] and m["embedder"]["dim"] == 384  # by the machine
    assert m["index"]["kind"] == "flat" and m["index"]["recall"] == 1.0
    assert m["tokenizer"]["kind"] == "sentencepiece" and len(m["tokenizer"]["sha256"]) == 64
    valid = set(d.documents("valid").tolist())
    assert not valid & set(np.unique(d.chunk_doc).tolist())  # held-out documents are not in the database
    # values: [chunk, continuation]; the continuation of a document's last chunk is masked
    last = np.flatnonzero(np.diff(d.chunk_doc, append=-1) != 0)[0]
    tokens, mask = d.values(np.array([last - 1, last, -1]))
    assert mask[0].all() or mask[0, :16].all()
    assert np.array_equal(tokens[0, 16:16 + d.chunk_len[last]], d.chunk_tokens(last))
    assert not mask[1, 16:].any() and not mask[2].any()
    assert (tokens[2] == d.pad_id).all()


def test_existing_database_needs_overwrite(tmp_path, db):
    copy = tmp_path / "copy"
    shutil.copytree(db, copy)
    corpus = write_corpus(tmp_path / "corpus", docs=4)
    with pytest.raises(RetroError, match="already holds a database; pass --overwrite"):
        build_database(options(corpus, copy), log=lambda *_: None)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(RetroError, match="refuses to empty"):
        build_database(options(corpus, tmp_path / "mine", overwrite=True), log=lambda *_: None)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    build_database(options(corpus, copy, overwrite=True), log=lambda *_: None)
    assert ChunkDatabase(copy).manifest["counts"]["documents"] == 4


@pytest.mark.slow
def test_two_process_build_matches_single_process(tmp_path, db):
    import os
    import subprocess
    import sys

    from tests.helpers.retrieval_helpers import ROOT, SUBPROCESS_TIMEOUT, free_port

    corpus = write_corpus(tmp_path / "corpus")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'python'}", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "retro", *build_args(corpus, tmp_path / "two")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ChunkDatabase(db), ChunkDatabase(tmp_path / "two")
    for name in ("tokens", "doc_start", "doc_split", "chunk_start", "chunk_len", "chunk_doc"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-4)


# ---- faults ------------------------------------------------------------------------------------


def test_bad_databases_are_named(tmp_path, db):
    def broken(edit):
        path = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(db, path)
        edit(path)
        return path

    def set_manifest(path, **kw):
        m = json.loads((path / "manifest.json").read_text())
        m.update(kw)
        (path / "manifest.json").write_text(json.dumps(m))

    with pytest.raises(RetroError, match="format version 0.*rebuild"):
        ChunkDatabase(broken(lambda p: set_manifest(p, format_version=0)))
    with pytest.raises(RetroError, match="chunk_len.npy has shape .* but the manifest"):
        ChunkDatabase(broken(lambda p: np.save(p / "chunk_len.npy", np.zeros(3, np.int16))))
    with pytest.raises(RetroError, match="tokenizer .* does not match its manifest"):
        other = SentencePieceTokenizer.train(["entirely different words " * 50], 40)
        _ = ChunkDatabase(broken(lambda p: other.save(p / "tokenizer.model"))).tokenizer  # loaded when read
    with pytest.raises(RetroError, match=re.escape(f"built with the embedder '{default_embedder()[0]}'")):
        Retriever.load(db, embedder="bert-base-uncased")
    with pytest.raises(RetroError, match="not a retro database"):
        ChunkDatabase(tmp_path)


def test_empty_corpora_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n   ")
    with pytest.raises(RetroError, match="no non-empty document"):
        build_database(options(tmp_path / "empty", tmp_path / "o1"), log=lambda *_: None)
    with pytest.raises(RetroError, match=r"no non-empty document: 1 files found, 0 non-empty documents; "
                                         r"skipped: 0 binary, 1 empty"):
        build_database(options(tmp_path / "blank", tmp_path / "o2"), log=lambda *_: None)
    proc = run_cli(*build_args(tmp_path / "nope", tmp_path / "o3"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# ---- search ------------------------------------------------------------------------------------


def test_search_texts_tokens_and_exclusion(db):
    r = Retriever.load(db)
    d = r.db
    c = 7
    text = d.chunk_text(c)
    res = r.search([text], k=3)
    assert res.ids[0, 0] == c and res.distances[0, 0] < 1e-3  # an exact chunk finds itself
    assert np.all(np.diff(res.distances[0]) >= 0)
    assert res.tokens.shape == (1, 3, 32) and res.mask.shape == (1, 3, 32)
    by_tokens = r.search([d.chunk_tokens(c)], k=3)
    assert np.array_equal(by_tokens.ids, res.ids)
    own = int(d.chunk_doc[c])
    excl = r.search([text], k=4, exclude_doc_ids=[own])
    assert (d.chunk_doc[excl.ids[0]] != own).all()
    with pytest.raises(RetroError, match="k=100000 is larger than the database"):
        r.search([text], k=100_000)


def test_exclusion_masks_instead_of_substituting(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "big.txt").write_text(" ".join(["alpha beta gamma"] * 200))
    (corpus / "small.txt").write_text("omega sigma kappa lambda")
    build_database(options(corpus, tmp_path / "db", valid_fraction=0.0), log=lambda *_: None)
    r = Retriever.load(tmp_path / "db")
    big = int(r.db.chunk_doc[0])
    n_other = int((r.db.chunk_doc != big).sum())
    res = r.search(["alpha beta gamma"], k=n_other + 2, exclude_doc_ids=[big])
    assert (res.ids[0, :n_other] >= 0).all() and (res.ids[0, n_other:] == -1).all()
    assert not res.mask[0, n_other:].any() and np.isinf(res.distances[0, n_other:]).all()


def test_neighbours_exclude_own_document_and_resume(db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    path = compute_neighbours(copy, k=2, extra=2, block=50, progress=False, log=lambda *_: None)
    nb = load_neighbours(copy, 4)
    d = ChunkDatabase(copy)
    assert nb.shape == (d.num_chunks, 4) and (nb >= 0).all()
    assert (d.chunk_doc[nb] != d.chunk_doc[:, None]).all()
    first = path.read_bytes()
    path.unlink()
    (copy / "neighbours-4.json").unlink()
    parts = copy / "neighbours-4-parts"
    parts.mkdir()
    np.save(parts / "part-000000.npy", nb[:50])  # as if a run had stopped after one block
    compute_neighbours(copy, k=2, extra=2, block=50, progress=False, log=lambda *_: None)
    assert path.read_bytes() == first and not parts.exists()


@pytest.mark.slow
def test_query_command(db):
    d = ChunkDatabase(db)
    out = run_cli("query", str(db), d.chunk_text(3), "-k", "2").stdout
    assert out.startswith("#0: chunk 3 of document") and "#1: chunk" in out
    bad = run_cli("query", str(db), "x", "-k", "0", check=False)
    assert bad.returncode == 2 and "-k must be an integer in [1, 40], got 0" in bad.stderr
