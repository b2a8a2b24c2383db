"""A database built with a faiss index (index.faiss) still loads where faiss is not installed (the
lent GPU machines): its stored keys are searched exactly in torch, with one warning that names the
fallback and how to get faiss, and the neighbours are those of faiss's exact (flat) search."""
import sys
import warnings

import numpy as np
import pytest

from tests.helpers.retrieval_helpers import quick_database
from retro.retrieval import Retriever


@pytest.fixture(scope="module", params=[1, 2], ids=["one-index", "two-shards"])
def flat_db(request, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        return quick_database(tmp_path_factory.mktemp("faiss_fallback"), mp, docs=12, index="flat",
                              shards=request.param)
    finally:
        mp.undo()


def test_a_faiss_database_loads_without_faiss_and_finds_the_same_neighbours(flat_db, monkeypatch):
    pytest.importorskip("faiss")
    with_faiss = Retriever.load(flat_db)
    sharded = with_faiss.index.kind == "sharded"
    assert with_faiss.index.faiss is not None if sharded else with_faiss.index.kind == "flat"
    rng = np.random.default_rng(0)
    chunks = rng.choice(with_faiss.db.num_chunks, 40, replace=False)
    queries = with_faiss.db.embeddings[chunks] + rng.normal(0, 0.05, (40, with_faiss.db.embeddings.shape[1]))
    docs = with_faiss.db.chunk_doc[chunks]
    want = [with_faiss.search_embeddings(queries, 5), with_faiss.search_embeddings(queries, 5, docs)]

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError, as where it is missing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        without = Retriever.load(flat_db)
        got = [without.search_embeddings(queries, 5), without.search_embeddings(queries, 5, docs)]
    messages = [str(w.message) for w in caught if "faiss" in str(w.message)]
    assert len(messages) == 1, messages
    assert "exact" in messages[0] and "torch" in messages[0] and "pip install" in messages[0]
    assert without.index.faiss is None if sharded else without.index.kind == "torch"
    keys = np.asarray(without.db.embeddings, dtype=np.float64)
    for (want_ids, want_d), (ids, d) in zip(want, got):
        # (the test embedder's keys tie often: the ids may differ where the distances are equal)
        assert (ids >= 0).all() and (ids == want_ids).mean() > 0.8
        exact = np.square(queries[:, None, :] - keys[ids]).sum(-1)
        np.testing.assert_allclose(exact, want_d, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-5)
