"""Evaluation accounting: bits per byte count exactly the bytes of the scored tokens; the groups of
scored tokens (by the neighbours they attended) sum to evaluate's totals, so the overlap table's
alpha = 1 row is evaluate's result, and its chunk overlap r(C) is the longest common substring
(checked by brute force); evaluating against a part of the database."""
import numpy as np
import pytest
import torch

from tests.helpers.retrieval_helpers import write_corpus
from retro.evaluation.evaluate import evaluate, prepare, score, summarise
from retro.evaluation.overlap import chunk_overlap, group_overlaps, longest_common_substring, overlap_rows
from retro.model.model import RetroModel, preset
from retro.retrieval import BuildOptions, Retriever, build_database
from retro.retrieval.retriever import database_fraction

M = 16


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    corpus = write_corpus(root / "corpus", docs=10, words=260)
    (corpus / "doc900.txt").write_text("alpha")                   # one token
    (corpus / "doc901.txt").write_text("naïve café ✓ 🙂 " * 6)   # characters spelt with byte pieces
    build_database(BuildOptions(corpus=str(corpus), out=str(root / "db"), vocab_size=1000, chunk_size=M,
                                block_size=256, valid_fraction=0.3, progress=False), log=lambda *_: None)
    return Retriever.load(root / "db")


@pytest.fixture(scope="module")
def model(retriever):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=retriever.db.tokenizer.vocab_size, chunk_size=M, max_seq_len=3 * M, dim=32,
                 ff_dim=64, heads=2, head_dim=16, depth=2, cca_layers=(1,), enc_dim=32, enc_heads=2, enc_head_dim=16,
                 backend="reference")
    m = RetroModel(cfg).eval()
    for p in m.parameters():  # a model whose neighbours matter: random, larger weights
        p.data.normal_(0, 0.2)
    return m


def test_prefix_bytes_are_exact(retriever):
    db = retriever.db
    tok = db.tokenizer
    for d in range(len(db.doc_start) - 1):
        ids = db.document_tokens(d)
        cuts = sorted({0, 1, len(ids), *range(0, len(ids), 7)})
        assert tok.prefix_bytes(ids, cuts) == [len(tok.decode(ids[:c]).encode("utf-8")) for c in cuts]
        assert tok.prefix_bytes(ids, [len(ids)]) == [int(db.doc_bytes[d])]  # the tokenizer round-trips


def test_bits_per_byte_count_exactly_the_scored_tokens(retriever, model):
    db = retriever.db
    docs = np.arange(len(db.doc_start) - 1)  # every document, the one-token one included
    res = evaluate(model, retriever, k=2, documents=docs, progress=False)
    tok = db.tokenizer
    want_bytes = want_tokens = 0
    nll = 0.0
    for d in docs:
        ids = db.document_tokens(int(d))
        want_tokens += max(0, len(ids) - 1)
        # the first token is never predicted: its bytes are not counted
        want_bytes += int(db.doc_bytes[d]) - len(tok.decode(ids[:1]).encode("utf-8")) if len(ids) else 0
        t = torch.tensor(ids, dtype=torch.long)
        for s in range(0, len(t) - 1, model.cfg.max_seq_len):  # RETRO[OFF] by hand
            x, y = t[s:s + model.cfg.max_seq_len], t[s + 1:s + model.cfg.max_seq_len + 1]
            with torch.no_grad():
                nll += torch.nn.functional.cross_entropy(model(x[None, :len(y)])[0], y, reduction="sum").item()
    assert res.tokens == want_tokens and res.bytes == want_bytes
    assert res.bpb_off == pytest.approx(nll / np.log(2) / want_bytes, rel=1e-6)
    one = [d for d in docs if len(db.document_tokens(int(d))) == 1]
    assert one, "the corpus should hold a one-token document"
    without = evaluate(model, retriever, k=2, documents=[d for d in docs if d not in one], progress=False)
    assert (without.bytes, without.tokens) == (res.bytes, res.tokens)  # it added nothing
    assert without.bpb_on == pytest.approx(res.bpb_on, rel=1e-9)


def test_groups_follow_the_attended_neighbours(retriever):
    es = prepare(retriever, 2, seq_len=3 * M)
    for w, (_, tgt) in enumerate(es.windows):
        groups = es.window_groups[w]
        assert len(groups) == len(tgt)
        for j, g in enumerate(groups):  # target j+1 of the window is predicted at position j
            assert es.group_chunk[g] == (j + 1) // M - 1 and es.group_window[g] == w
    assert es.group_tokens.sum() == sum(len(t) for _, t in es.windows)
    assert (es.group_bytes >= 0).all()


def test_overlap_table_totals_equal_evaluate(retriever, model):
    es = prepare(retriever, 2, seq_len=3 * M)
    res = evaluate(model, retriever, k=2, eval_set=es, progress=False)
    nll = {"on": score(model, es, True, progress=False), "off": score(model, es, False, progress=False)}
    overlaps = group_overlaps(es)
    assert overlaps.min() >= 0 and overlaps.max() <= 1 and (overlaps[es.group_chunk < 0] == 0).all()
    assert (overlaps > 0).any()
    rows = overlap_rows(es, overlaps, nll)
    last = rows[-1]
    assert last["alpha"] == 1.0 and last["fraction"] == 1.0
    assert (last["bytes"], last["tokens"]) == (res.bytes, res.tokens)
    assert last["on"] == pytest.approx(res.bpb_on, rel=1e-12) and last["off"] == pytest.approx(res.bpb_off, rel=1e-12)
    assert [r["bytes"] for r in rows] == sorted(r["bytes"] for r in rows)
    # tokens that attended nothing score the same with and without retrieval
    none = es.group_chunk < 0
    np.testing.assert_allclose(nll["on"][none], nll["off"][none], rtol=1e-6)
    assert not np.allclose(nll["on"][~none], nll["off"][~none])


def test_summaries_of_selected_documents(retriever, model):
    es = prepare(retriever, 2, seq_len=3 * M)
    nll_on, nll_off = score(model, es, True, progress=False), score(model, es, False, progress=False)
    d0 = es.documents[0]
    part = summarise(es, nll_on, nll_off, es.group_doc == d0)
    alone = evaluate(model, retriever, k=2, documents=[d0], progress=False)
    assert part.bytes == alone.bytes and part.bpb_off == pytest.approx(alone.bpb_off, rel=1e-9)
    assert part.documents == 1


def test_database_fraction_nests_and_restricts_retrieval(retriever):
    db = retriever.db
    parts = [set(database_fraction(db, f).tolist()) for f in (0.125, 0.25, 0.5, 1.0)]
    assert all(a <= b for a, b in zip(parts, parts[1:])) and parts[-1] == set(range(db.num_chunks))
    small = np.array(sorted(parts[1]))
    es = prepare(retriever, 2, seq_len=3 * M, allowed_chunks=small)
    found = es.neighbour_ids[es.neighbour_ids >= 0]
    assert len(found) and np.isin(found, small).all()
    full = prepare(retriever, 2, seq_len=3 * M, allowed_chunks=np.arange(db.num_chunks))
    exact = prepare(retriever, 2, seq_len=3 * M)
    np.testing.assert_array_equal(full.neighbour_ids, exact.neighbour_ids)  # a flat index is exact too
    with pytest.raises(ValueError, match="fraction"):
        database_fraction(db, 0.0)


def test_longest_common_substring_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(50):
        a, b = rng.integers(0, 4, rng.integers(0, 12)), rng.integers(0, 4, rng.integers(0, 20))
        brute = max([L for i in range(len(a)) for j in range(len(b)) for L in range(1, min(len(a) - i, len(b) - j) + 1)
                     if np.array_equal(a[i:i + L], b[j:j + L])], default=0)
        assert longest_common_substring(a, b) == brute
    chunk = np.arange(8)
    assert chunk_overlap(chunk, [np.r_[9, 9, 2, 3, 4, 9], np.r_[0, 1, 9]], 8) == pytest.approx(3 / 8)
