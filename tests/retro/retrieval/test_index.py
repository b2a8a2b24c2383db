"""Index kinds on clustered synthetic vectors: exact kinds agree, approximate kinds reach the
target recall after nprobe tuning, and the measured recall is honest."""
import numpy as np
import pytest

from retro import RetroError
from retro.retrieval.index import (IndexSettings, SearchIndex, TorchExactIndex, build_faiss, choose_kind,
                                   recall_at, tune_nprobe)


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32)).astype(np.float32) * 4
    return (centres[rng.integers(0, 40, 6000)] + rng.normal(size=(6000, 32))).astype(np.float32)


def test_choose_kind_by_size():
    assert [choose_kind(n) for n in (10, 49_999, 50_000, 4_999_999, 5_000_000)] == \
        ["flat", "flat", "ivf-fastscan", "ivf-fastscan", "ivf-pq"]


def test_torch_exact_matches_faiss_flat(vectors):
    flat, settings = build_faiss("flat", vectors)
    q = vectors[:50] + 0.01
    d1, i1 = SearchIndex(settings, flat).search(q, 10)
    d2, i2 = TorchExactIndex(vectors, device="cpu", block_elements=50 * 1000).search(q, 10)  # several blocks
    assert recall_at(i2, i1, 10) > 0.999
    np.testing.assert_allclose(d2, d1, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind, target", [("ivf-flat", 0.95), ("ivf-fastscan", 0.95),
                                          pytest.param("ivf-pq", 0.5, marks=pytest.mark.slow)])
def test_nprobe_tuning_reaches_target(vectors, kind, target):
    index, settings = build_faiss(kind, vectors)
    assert settings.nlist > 1 and (settings.pq_m > 0) == (kind != "ivf-flat")
    search = SearchIndex(settings, index)
    nprobe, recall = tune_nprobe(search, vectors, target, k=10, queries=300)
    assert recall >= target and 1 <= nprobe <= settings.nlist
    exact = TorchExactIndex(vectors, device="cpu").search(vectors[1000:1300], 10)[1]
    search.set_nprobe(nprobe)
    measured = recall_at(search.search(vectors[1000:1300], 10)[1], exact, 10)
    assert measured >= target - 0.05  # the tuned recall holds on other queries


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-fastscan"])
def test_index_builds_are_deterministic(vectors, kind):
    import faiss

    a, _ = build_faiss(kind, vectors)
    b, _ = build_faiss(kind, vectors)
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b))


def test_fastscan_reranks_by_exact_distance(tmp_path, vectors):
    """ivf-fastscan's distances are the exact ones of the chunks it returns (re-ranked), and it
    survives a write and read as the database stores it."""
    import faiss

    index, settings = build_faiss("ivf-fastscan", vectors)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    search = SearchIndex(settings, faiss.read_index(str(tmp_path / "i.faiss")))
    search.set_nprobe(settings.nlist)
    q = vectors[:40] + 0.05
    d, i = search.search(q, 5)
    exact = ((q[:, None, :] - vectors[i]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-3)


def test_k_larger_than_database_is_named(vectors):
    search = SearchIndex(IndexSettings(kind="torch"), vectors=vectors[:5], device="cpu")
    with pytest.raises(RetroError, match="k=6 is larger than the database"):
        search.search(vectors[:1], 6)


def test_tuned_nprobe_is_the_smallest_that_reaches_the_target(vectors):
    """Not the next power of two: each list probed is scanned by every query of the neighbours' search."""
    from retro.retrieval.index import _without

    index, settings = build_faiss("ivf-flat", vectors)
    search = SearchIndex(settings, index)
    ids = np.sort(np.random.default_rng(0).choice(len(vectors), 300, replace=False))  # tune_nprobe's queries
    exact = _without(TorchExactIndex(vectors, device="cpu").search(vectors[ids], 11)[1], ids, 10)

    def measured(nprobe):
        search.set_nprobe(nprobe)
        return recall_at(_without(search.search(vectors[ids], 11)[1], ids, 10), exact, 10)

    tuned = []
    for target in (0.9, 0.97, 0.99, 0.995):
        nprobe, recall = tune_nprobe(search, vectors, target, k=10, queries=300)
        assert recall == measured(nprobe) >= target > measured(nprobe - 1), (target, nprobe)
        tuned.append(nprobe)
    assert any(n & (n - 1) for n in tuned), tuned  # here some are not powers of two


def test_exact_index_norms_match_and_keys_are_not_copied(vectors):
    exact = TorchExactIndex(vectors, device="cpu")
    np.testing.assert_allclose(exact.norms.numpy(), (vectors.astype(np.float64) ** 2).sum(1), rtol=1e-5)
    assert exact.x.data_ptr() == vectors.__array_interface__["data"][0]  # float32 keys on the CPU: shared


def test_fastscan_searches_in_batches_whose_lookup_tables_fit_the_budget(vectors, monkeypatch):
    import retro.retrieval.index as index_module

    index, settings = build_faiss("ivf-fastscan", vectors)
    search = SearchIndex(settings, index)
    search.set_nprobe(8)
    q = vectors[::7] + 0.01
    whole = search.search(q, 10)

    class Recording:
        def __init__(self, impl):
            self.impl, self.sizes = impl, []

        def search(self, queries, k):
            self.sizes.append(len(queries))
            return self.impl.search(queries, k)

    per_query = 8 * settings.pq_m * 16  # nprobe x sub-quantisers x 16 one-byte entries
    monkeypatch.setattr(index_module, "LUT_BUDGET", 100 * per_query)
    search.impl = recording = Recording(index)
    batched = search.search(q, 10)
    assert max(recording.sizes) == 100 and sum(recording.sizes) == len(q) > 100
    np.testing.assert_array_equal(batched[1], whole[1])
    np.testing.assert_array_equal(batched[0], whole[0])


def test_fastscan_holds_the_keys_it_added_as_a_view(tmp_path, vectors):
    """stored_keys: ivf-fastscan's re-ranking copy, the keys bit for bit after a write and read, in the
    index's memory (a view, not a copy); None where the index holds codes only."""
    import faiss

    index, settings = build_faiss("ivf-fastscan", vectors)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    search = SearchIndex(settings, faiss.read_index(str(tmp_path / "i.faiss")))
    held = search.stored_keys()
    assert held.dtype == np.float32 and not held.flags.owndata
    assert np.array_equal(held, vectors)
    for kind in ("flat", "ivf-flat"):
        index, settings = build_faiss(kind, vectors[:2000])
        assert SearchIndex(settings, index).stored_keys() is None


def test_neighbours_search_reads_the_keys_the_index_holds(tmp_path, monkeypatch):
    """The neighbours' queries come from the index's copy of the keys, and give what the keys of
    embeddings.npy give."""
    from tests.helpers.retrieval_helpers import quick_database
    from retro.retrieval import Retriever

    db = quick_database(tmp_path, monkeypatch, docs=12, words=400, index="ivf-fastscan")
    retriever = Retriever.load(db)
    held = retriever.index.stored_keys()
    assert held is not None and np.array_equal(held, np.asarray(retriever.db.embeddings, dtype=np.float32))
    ids = np.arange(0, retriever.db.num_chunks, 3)
    got = retriever.search_chunks(ids, 4, exclude_doc_ids=retriever.db.chunk_doc[ids])
    monkeypatch.setattr(SearchIndex, "stored_keys", lambda self: None)
    want = retriever.search_chunks(ids, 4, exclude_doc_ids=retriever.db.chunk_doc[ids])
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
