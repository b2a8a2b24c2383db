"""Nearest-neighbour indexes over chunk embeddings (L2 distance).

Kinds, chosen by database size unless named:
  flat          exact (faiss IndexFlatL2)                                   < 50 000 chunks
  ivf-flat      inverted lists, exact distances (IndexIVFFlat)              < 5 000 000 chunks with faiss on
                GPUs
  ivf-fastscan  inverted lists scanned by 4-bit product-quantisation codes  < 5 000 000 chunks on the CPU
                (faiss "fast scan", SIMD lookups), the best 4k re-ranked by exact distance
                (IVF,PQx4fs,RFlat): 10x the queries/s of ivf-flat at the same recall
  ivf-pq        rotation + inverted lists + product quantisation (OPQ,IVF,PQ)   larger
  torch     exact search in torch, on the GPU when there is one (for faiss builds without GPUs)
faiss indexes train on a sample, run on every GPU faiss sees (sharded) and on the CPU otherwise;
nprobe is tuned until recall@k against exact search reaches the target on a sample of queries.
On GPUs faiss returns at most 2048 neighbours and probes at most 2048 lists (FAISS_GPU_MAX_K), and
IVF-PQ's lookup tables must fit a block's shared memory (gpu_cloner_settings).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..base.errors import RetroError, damaged_file

KINDS = ("auto", "flat", "ivf-flat", "ivf-fastscan", "ivf-pq", "torch")
IVF_KINDS = ("ivf-flat", "ivf-fastscan", "ivf-pq")
REFINE_FACTOR = 4  # ivf-fastscan re-ranks k x this many candidates by exact distance
LARGE_CPU = 500_000  # keys above which a CPU ivf-fastscan index trains a cheaper coarse quantiser
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection limit (GPU_MAX_SELECTION_K): k and nprobe at most this
LUT_BUDGET = 256 << 20  # bytes of ivf-fastscan lookup tables one search call may build (SearchIndex.query_batch)
GPU_SHARED_MEMORY = 48 * 1024  # bytes of shared memory per block faiss's GPU IVF-PQ lookup tables must fit in


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def warn_without_faiss(path, kind: str) -> None:
    """The one warning of a database with a faiss index loaded where faiss is not installed."""
    warnings.warn(f"{str(path)!r}: faiss is not installed, so the database's {kind} faiss index is replaced by an "
                  "exact search of its stored keys in torch (on the GPU when there is one; the neighbours of "
                  "a flat index); pip install faiss-cpu, or faiss-gpu on GPUs (retro-kernels[gpu]), to use it",
                  RuntimeWarning, stacklevel=3)


def choose_kind(n: int) -> str:
    """The index kind "auto" means for n keys: exact search while small, IVF above; torch exact
    search where faiss is not installed (GPU machines without faiss-gpu, say)."""
    if not faiss_available():
        return "torch"
    if n < 50_000:
        return "flat"
    if n < 5_000_000 and faiss_gpus():  # faiss's GPU indexes have no fast scan
        return "ivf-flat"
    if n < 5_000_000:
        return "ivf-fastscan"
    return "ivf-pq"


# what to do about a missing or damaged index file of a finished database
INDEX_REMEDY = "run the database's build-db command again with --resume (and its options): it rebuilds the index"


def read_faiss_index(path, remedy: str = INDEX_REMEDY):
    """faiss.read_index(path); a missing or damaged file (cut short, overwritten) is a RetroError
    naming it, then `remedy` (by default: how to rebuild it)."""
    import faiss

    if not Path(path).is_file():
        raise RetroError(f"{str(path)!r} is missing; {remedy}")
    try:
        return faiss.read_index(str(path))
    except RuntimeError:  # faiss's message names its C++ function; what matters is which file
        raise damaged_file(path, "faiss cannot read it: cut short or overwritten", remedy) from None


@contextmanager
def faiss_threads(n: int):
    """faiss's OpenMP threads set to n inside the block, restored after it."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def gpu_cloner_settings(kind: str, dim: int) -> dict:
    """The faiss GpuMultipleClonerOptions a `kind` index of dim-dim keys goes to the GPUs with:
    sharded over them all; for ivf-pq, float16 lookup tables where float32 ones (pq_m x 256 codes
    x 4 bytes) would not fit GPU_SHARED_MEMORY: at 384 dims (MiniLM) 64 sub-quantisers need 64 KiB
    in float32, which faiss refuses, and 32 KiB in float16."""
    settings = {"shard": True}
    if kind == "ivf-pq":
        settings["useFloat16LookupTables"] = _pq_m(dim) * 256 * 4 > GPU_SHARED_MEMORY
    return settings


def to_all_gpus(index, kind: str):
    """index copied to every GPU faiss sees, with gpu_cloner_settings."""
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    for name, value in gpu_cloner_settings(kind, index.d).items():
        setattr(co, name, value)
    return faiss.index_cpu_to_all_gpus(index, co)


@dataclass
class IndexSettings:
    kind: str
    nlist: int = 0
    pq_m: int = 0
    nprobe: int = 0
    recall: float | None = None  # measured recall@recall_k against exact search
    recall_k: int = 10
    trained_on: int = 0
    extra: dict = field(default_factory=dict)


class TorchExactIndex:
    """Exact L2 search by matrix products in torch; fp16 storage on a GPU."""

    def __init__(self, vectors: np.ndarray, device=None, block_elements: int = 1 << 26):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        with warnings.catch_warnings():  # a read-only memory map is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.x = torch.as_tensor(np.asarray(vectors, dtype=np.float32)).to(self.device, dtype)
        # squared norms a block of rows at a time: no temporary the size of the keys
        self.norms = torch.cat([self.x[s:s + 65_536].float().square().sum(1) for s in range(0, len(self.x), 65_536)]
                               or [torch.zeros(0, device=self.device)])
        self.ntotal = self.x.shape[0]
        self.block_elements = block_elements  # queries x vectors per distance block

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=self.device)
        k = min(k, self.ntotal)
        best_d = torch.full((q.shape[0], 0), float("inf"), device=self.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=self.device)
        qn = q.square().sum(1, keepdim=True)
        block = max(1024, self.block_elements // max(1, q.shape[0]))
        for s in range(0, self.ntotal, block):
            xb = self.x[s:s + block]
            d = qn - 2 * (q.to(xb.dtype) @ xb.T).float() + self.norms[s:s + block]
            dd, ii = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            best_d = torch.cat([best_d, dd], 1)
            best_i = torch.cat([best_i, ii + s], 1)
            best_d, pos = torch.topk(best_d, min(k, best_d.shape[1]), dim=1, largest=False)
            best_i = torch.gather(best_i, 1, pos)
        return best_d.clamp(min=0).cpu().numpy(), best_i.cpu().numpy()


def _pq_m(dim: int) -> int:
    for m in (64, 48, 32, 24, 16, 12, 8, 6, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


def build_faiss(kind: str, vectors: np.ndarray, seed: int = 0, progress=None, block: int = 65_536):
    """Trains (on a sample) and fills a faiss index of `kind` on the CPU, or on all GPUs faiss
    sees, returning the CPU index and its settings."""
    index, settings = train_faiss(kind, vectors, seed)
    return fill_faiss(index, kind, vectors, progress, block), settings


def train_faiss(kind: str, vectors: np.ndarray, seed: int = 0):
    """An empty faiss index of `kind` over vectors (n, dim), trained on a seeded sample of them
    (nothing to train for flat), and its settings."""
    import faiss

    n, dim = vectors.shape
    settings = IndexSettings(kind=kind)
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
        # k-means costs sample x nlist x dim per iteration: on the CPU above LARGE_CPU keys, half the
        # lists (fast scan keeps the longer lists cheap to scan) and faiss's minimum of 39 points each
        large_cpu = kind == "ivf-fastscan" and n > LARGE_CPU and not faiss_gpus()
        nlist = int(min(65_536, max(16, (2 if large_cpu else 4) * math.sqrt(n))))
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
        settings.nlist = nlist
        if kind == "ivf-flat":
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
        elif kind == "ivf-fastscan":
            m = dim // 2 if dim % 2 == 0 else dim
            settings.pq_m = m
            index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x4fs,RFlat")
            faiss.downcast_index(index).k_factor = REFINE_FACTOR
        else:
            m = _pq_m(dim)
            settings.pq_m = m
            index = faiss.index_factory(dim, f"OPQ{m},IVF{nlist},PQ{m}")
        # k-means on the CPU costs sample x nlist x dim per iteration: 64 points per list there
        # (faiss warns below 39), 256 on GPUs
        sample_n = min(n, max((256 if faiss_gpus() else 39 if large_cpu else 64) * nlist, 50_000))
        rng = np.random.default_rng(seed)
        sample = np.asarray(vectors[np.sort(rng.choice(n, sample_n, replace=False))], dtype=np.float32)
        settings.trained_on = sample_n
        gpus = faiss_gpus()
        if gpus and kind == "ivf-flat":  # train the coarse quantiser on the GPUs
            clus = faiss.Clustering(dim, nlist)
            clus.seed = seed
            clus.train(sample, faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim)))
            centroids = faiss.vector_float_to_array(clus.centroids).reshape(nlist, dim)
            index.quantizer.add(centroids)
            index.is_trained = True
        else:  # faiss's k-means and OPQ use fixed seeds: the same sample gives the same index
            # on one thread: product quantisation trains pq_m small k-means, each a parallel region too
            # small to share, and on busy cores OpenMP's waiting threads made it 80x slower on two
            # threads than on one (192 sub-quantisers, 30k keys: 197 s against 2.4 s; k-means 20 s
            # against 4.5 s)
            with faiss_threads(1):
                index.train(sample)
    return index, settings


def fill_faiss(index, kind: str, vectors: np.ndarray, progress=None, block: int = 65_536):
    """Adds vectors (n, dim) to the trained CPU index (on all GPUs faiss sees, for the kinds that
    run there), `block` at a time; returns the CPU index."""
    import faiss

    n = len(vectors)
    gpu_index = None
    if faiss_gpus() and kind not in ("flat", "ivf-fastscan"):
        gpu_index = to_all_gpus(index, kind)
    target = gpu_index if gpu_index is not None else index
    for s in range(0, n, block):
        target.add(np.asarray(vectors[s:s + block], dtype=np.float32))
        if progress is not None:
            progress(min(block, n - s))
    if gpu_index is not None:
        index = faiss.index_gpu_to_cpu(gpu_index)
    return index


class SearchIndex:
    """A loaded index: faiss (on all GPUs when faiss has them) or torch exact search. max_k: the
    most neighbours one search returns (FAISS_GPU_MAX_K on GPUs, None: the whole database)."""

    def __init__(self, settings: IndexSettings, faiss_index=None, vectors=None, device=None):
        self.settings = settings
        self.kind = settings.kind
        self.max_k = None
        if self.kind == "torch":
            self.impl = TorchExactIndex(vectors, device)
            self.ntotal = self.impl.ntotal
            return
        self.faiss_index = faiss_index
        on_gpus = faiss_gpus() and self.kind != "ivf-fastscan"  # faiss GPU indexes have no fast scan
        if on_gpus:
            self.max_k = FAISS_GPU_MAX_K
        if settings.nprobe:  # before the copy to the GPUs, which takes it
            self.set_nprobe(settings.nprobe)
        if "k_factor" in settings.extra:
            self.set_refine_factor(int(settings.extra["k_factor"]))
        self.impl = to_all_gpus(faiss_index, self.kind) if on_gpus else faiss_index
        self.ntotal = faiss_index.ntotal

    def stored_keys(self) -> np.ndarray | None:
        """The keys the index holds, (ntotal, dim) float32, bit-equal to the keys added, as a view of
        the index's own memory (no copy): ivf-fastscan's copy for re-ranking. None for the other
        kinds (their codes are not the keys). The view is valid while this SearchIndex lives. The
        neighbours' search and the build's nprobe tuning read keys from it instead of mapping
        embeddings.npy as well, which would hold the keys in memory twice (1.5 GB at 1M chunks)."""
        if self.kind != "ivf-fastscan":
            return None
        import faiss

        flat = faiss.downcast_index(faiss.downcast_index(self.faiss_index).refine_index)
        if not isinstance(flat, faiss.IndexFlat) or flat.ntotal == 0:
            return None
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)

    def set_nprobe(self, nprobe: int) -> None:
        """nprobe lists probed per query; on GPUs at most max_k (the most faiss probes there), on
        the CPU index too, which the GPUs copy."""
        import faiss

        if self.kind in IVF_KINDS:
            nprobe = min(nprobe, self.max_k or nprobe)
            faiss.extract_index_ivf(self.faiss_index).nprobe = nprobe
            if getattr(self, "impl", None) is not None and self.impl is not self.faiss_index:
                faiss.GpuParameterSpace().set_index_parameter(self.impl, "nprobe", nprobe)

    def refine_factor(self) -> int:
        """ivf-fastscan: how many candidates per result are re-ranked by exact distance."""
        import faiss

        return int(faiss.downcast_index(self.faiss_index).k_factor)

    def set_refine_factor(self, factor: int) -> None:
        import faiss

        faiss.downcast_index(self.faiss_index).k_factor = factor

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """-> distances (Q, k) float32 (squared L2), ids (Q, k) int64; -1 where fewer exist."""
        if k > self.ntotal:
            raise RetroError(f"k={k} is larger than the database ({self.ntotal} chunks)")
        check_max_k(k, self.max_k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        batch = self.query_batch()
        if len(queries) <= batch:
            return self.impl.search(queries, k)
        parts = [self.impl.search(queries[s:s + batch], k) for s in range(0, len(queries), batch)]
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])

    def query_batch(self) -> int:
        """The most queries one faiss call gets: ivf-fastscan on the CPU builds every query's uint8
        lookup tables (nprobe x pq_m x 16 bytes) for the whole call at once, 2.8 GB for 8,192 queries at
        nprobe 111 with 192 sub-quantisers: calls are cut to LUT_BUDGET bytes of them. (Larger calls
        scan each list once for more queries: on 150k keys at nprobe 111, 157 queries a call answered
        5,900 queries/s, 787 a call 9,200, 8,192 a call 8,300.)"""
        if self.kind != "ivf-fastscan":  # (never on GPUs: faiss has no fast scan there)
            return 1 << 62
        import faiss

        nprobe = faiss.extract_index_ivf(self.faiss_index).nprobe
        return max(16, LUT_BUDGET // (max(1, nprobe) * max(1, self.settings.pq_m) * 16))


def check_max_k(k: int, max_k: int | None) -> None:
    """RetroError where k is more neighbours than an index on GPUs returns."""
    if max_k is not None and k > max_k:
        raise RetroError(f"k={k} is more neighbours than faiss's GPU indexes return ({max_k}); ask for fewer, or "
                         "search exactly in torch (--index torch)")


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approx top-k & exact top-k| / k."""
    hits = [len(set(a[:k]) & set(e[:k])) for a, e in zip(approx, exact)]
    return float(np.mean(hits)) / k


def tune_nprobe(index: SearchIndex, vectors: np.ndarray, target: float, k: int = 10, queries: int = 1000,
                seed: int = 0) -> tuple[int, float]:
    """Smallest nprobe whose recall@k against exact search reaches `target` (powers of two, then
    bisection between the last two; recall grows with nprobe), on a
    sample of database vectors as queries with each query's own vector left out of both result
    lists (a database vector always finds itself, which would flatter the recall of queries from
    outside the database); returns (nprobe, measured recall)."""
    n = vectors.shape[0]
    k = min(k, n - 1)
    most = min(index.settings.nlist, index.max_k or index.settings.nlist)  # GPUs probe at most max_k lists
    if index.kind in ("flat", "torch") or k < 1:
        return 0, 1.0
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, min(queries, n), replace=False))
    q = np.asarray(vectors[ids], dtype=np.float32)

    # blocks of 16M distances: a few 64 MB temporaries, not a few 256 MB ones
    exact = _without(TorchExactIndex(vectors, device="cpu" if not torch.cuda.is_available() else None,
                                     block_elements=1 << 24).search(q, k + 1)[1], ids, k)

    def recall_with(nprobe: int, rows: slice = slice(None)) -> float:
        index.set_nprobe(nprobe)
        return recall_at(_without(index.search(q[rows], k + 1)[1], ids[rows], k), exact[rows], k)

    if index.kind == "ivf-fastscan":  # the re-ranked candidates bound the recall: enough of them first
        few = slice(0, min(200, len(ids)))
        while recall_with(most, few) < target and index.refine_factor() < 64:
            index.set_refine_factor(2 * index.refine_factor())
        index.settings.extra["k_factor"] = index.refine_factor()
    # powers of two until the target is reached, then the smallest nprobe between the last two that
    # reaches it (bisection): every list probed is scanned by every query of the neighbours' search
    low, nprobe = 0, 1  # low: an nprobe known to fall short (0: none tried)
    while True:
        recall = recall_with(nprobe)
        if recall >= target or nprobe >= most:
            break
        low, nprobe = nprobe, min(nprobe * 2, most)
    if recall < target:
        return nprobe, recall
    while nprobe - low > 1:
        mid = (low + nprobe) // 2
        mid_recall = recall_with(mid)
        if mid_recall >= target:
            nprobe, recall = mid, mid_recall
        else:
            low = mid
    index.set_nprobe(nprobe)
    return nprobe, recall


def _without(found: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    return np.array([[j for j in row if j != i][:k] for row, i in zip(found, ids)])
