"""faiss's GPU indexes have limits the CPU ones have not: k (and nprobe) at most 2048, and IVF-PQ
lookup tables that fit a block's 48 KiB of shared memory. These CPU tests check the parameters
the GPU path chooses, on a faiss that only pretends to have a GPU."""
from types import SimpleNamespace

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from retro.base.errors import RetroError  # noqa: E402
from retro.retrieval import index as ix  # noqa: E402
from retro.retrieval.retriever import Retriever  # noqa: E402

# faiss's GPU IVF-PQ: the bytes per code (sub-quantisers) and dimensions per sub-quantiser it supports
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_SUB_DIMS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 28, 32)


class Searched:
    """Stands in for the GPU copy of a CPU index: searches it, recording each k."""

    def __init__(self, index):
        self.index, self.ks, self.ntotal = index, [], index.ntotal

    def search(self, q, k):
        self.ks.append(k)
        return self.index.search(q, k)


@pytest.fixture
def one_gpu(monkeypatch):
    """faiss with one (pretended) GPU: cloning to it records the options and wraps the CPU index."""
    cloned = []

    def to_gpus(index, co=None):
        ivf = faiss.try_extract_index_ivf(index)
        cloned.append((co, ivf.nprobe if ivf is not None else None))  # the options, the nprobe it takes
        return Searched(index)

    monkeypatch.setattr(ix, "faiss_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", SimpleNamespace, raising=False)
    return cloned


def test_ivf_pq_at_384_dims_uses_float16_lookup_tables_on_gpus():
    m = ix._pq_m(384)
    assert (m, 384 // m) == (64, 6) and m in GPU_PQ_CODE_BYTES and 384 // m in GPU_PQ_SUB_DIMS
    options = ix.gpu_cloner_settings("ivf-pq", 384)
    assert options == {"shard": True, "useFloat16LookupTables": True}
    assert m * 256 * 4 > ix.GPU_SHARED_MEMORY >= m * 256 * 2  # float32 tables would not fit, float16 do
    assert ix.gpu_cloner_settings("ivf-pq", 64) == {"shard": True, "useFloat16LookupTables": False}  # 16 KiB
    assert ix.gpu_cloner_settings("ivf-flat", 384) == {"shard": True}


def test_a_search_index_on_gpus_takes_the_cloner_options_and_caps_k(one_gpu):
    rng = np.random.default_rng(0)
    flat = faiss.IndexFlatL2(16)
    flat.add(rng.normal(size=(3000, 16)).astype(np.float32))
    index = ix.SearchIndex(ix.IndexSettings(kind="flat"), flat)
    assert vars(one_gpu[0][0]) == ix.gpu_cloner_settings("flat", 16)
    assert index.max_k == ix.FAISS_GPU_MAX_K == 2048
    assert index.search(rng.normal(size=(2, 16)), 2048)[1].shape == (2, 2048)
    with pytest.raises(RetroError, match="k=2049.*2048"):
        index.search(rng.normal(size=(2, 16)), 2049)
    assert ix.SearchIndex(ix.IndexSettings(kind="torch"), vectors=rng.normal(size=(10, 16)), device="cpu").max_k is None


def test_own_document_widening_stays_within_the_gpu_limit(one_gpu):
    """k=1000 with every chunk in the query's own document: the search widens 2k+8 = 2008, then
    stops at 2048 (not the 5000 chunks), and what is still missing is masked."""
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(5000, 8)).astype(np.float32)
    flat = faiss.IndexFlatL2(8)
    flat.add(keys)
    db = SimpleNamespace(num_chunks=5000, chunk_doc=np.r_[np.zeros(4990, np.int64), np.ones(10, np.int64)],
                         embeddings=keys, manifest={"embedder": {"name": "test"}}, live_chunks=None)  # none removed
    retriever = Retriever(db, ix.SearchIndex(ix.IndexSettings(kind="flat"), flat))
    ids, dist = retriever.search_embeddings(keys[:3], 1000, exclude_doc_ids=np.zeros(3, np.int64))
    assert retriever.index.impl.ks == [2008, 2048]
    nearest = flat.search(keys[:3], 2048)[1]
    for row, near in zip(ids, nearest):  # the other document's chunks among the 2048 nearest, the rest masked
        found = near[near >= 4990]
        assert 0 < len(found) < 10 and list(row[:len(found)]) == list(found) and (row[len(found):] == -1).all()
    assert np.isinf(dist[ids < 0]).all()
    with pytest.raises(RetroError, match="k=2049"):
        retriever.search_embeddings(keys[:3], 2049, exclude_doc_ids=np.zeros(3, np.int64))


def test_nprobe_on_gpus_is_at_most_the_limit(one_gpu, monkeypatch):
    set_on_gpu = []
    monkeypatch.setattr(faiss, "GpuParameterSpace", lambda: SimpleNamespace(
        set_index_parameter=lambda index, name, value: set_on_gpu.append((name, value))), raising=False)
    rng = np.random.default_rng(2)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(8), 8, 4)
    ivf.train(rng.normal(size=(400, 8)).astype(np.float32))
    index = ix.SearchIndex(ix.IndexSettings(kind="ivf-flat", nlist=4, nprobe=3000), ivf)  # tuned on a CPU
    assert one_gpu[-1][1] == 2048  # the GPUs copy the CPU index with nprobe at most 2048
    index.set_nprobe(4096)
    assert set_on_gpu == [("nprobe", 2048)]
