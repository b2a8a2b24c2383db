"""A sharded exact index: the keys split by chunk id into N contiguous shards (`build-db --shards
N`), searched in one process (every shard, then a merge) or across processes (each rank searches
its shards, the top-k lists are all-gathered and merged). Either way the answer is the one of a
single exact index over all keys (a ShardedIndex of one shard), ties broken the same
deterministic way: by distance, then by global chunk id (the smaller first). Missing neighbours
are id -1 at distance inf, last.

Distances are computed in float64 and rounded to float32. A float32 matrix product rounds each
distance differently depending on the shape of the call (the BLAS kernel's blocking), so two keys
at the same distance from a query could come out 1 ulp apart in one shard and equal in another,
and a sharded search would order them differently from an unsharded one. In float64 the
float32 inputs' products are exact and the sums' rounding (1e-16) vanishes in the rounding to
float32, so a distance does not depend on the shard it is computed in. faiss's IndexFlatL2
computes in float32: it gives the same neighbours except where two distances are within its
rounding.

Shard s holds chunks bounds[s] .. bounds[s+1] - 1 (`shard_bounds`). On disk a sharded database
stores its shards as index-shards/shard-SSS.faiss (faiss IndexFlatL2, kind "flat") or reads them
from embeddings.npy (kind "torch"); its manifest's index entry carries {"shards", "bounds"} in
"extra".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..base.checks import check_int
from ..base.errors import RetroError

SHARD_DIR = "index-shards"


def shard_bounds(n: int, shards: int) -> np.ndarray:
    """(shards + 1,) int64: shard s holds ids bounds[s] .. bounds[s+1] - 1; sizes differ by at most 1."""
    check_int("--shards", shards, 1)
    if shards > n:
        raise RetroError(f"--shards must be at most the number of chunks ({n}), got {shards}")
    return np.array([s * n // shards for s in range(shards + 1)], dtype=np.int64)


def merge_topk(distances: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k lists of several shards, global ids, each (Q, k_s) (-1 / inf where missing) -> the k
    best of all, (Q, k) float32 and int64, sorted by distance, then by id; missing ones last."""
    d = np.concatenate([np.asarray(x, dtype=np.float32) for x in distances], axis=1)
    i = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids], axis=1)
    d = np.where(i < 0, np.inf, d)
    order = np.lexsort((np.where(i < 0, np.iinfo(np.int64).max, i), d), axis=1)[:, :k]
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    if d.shape[1] < k:  # fewer keys than k in all shards together
        pad = k - d.shape[1]
        d = np.concatenate([d, np.full((len(d), pad), np.inf, np.float32)], 1)
        i = np.concatenate([i, np.full((len(i), pad), -1, np.int64)], 1)
    return d, i


def exact_search(keys: torch.Tensor, queries: torch.Tensor, k: int, offset: int = 0,
                 block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top-k of queries (Q, dim) over keys (n, dim), ids offset + row, in float64
    rounded to float32, ties broken by the smaller id: -> distances (Q, min(k, n)) float32, ids
    (Q, min(k, n)) int64."""
    q = queries.to(keys.device, torch.float64)
    qn = q.square().sum(1, keepdim=True)
    best_d, best_i = [], []
    for s in range(0, keys.shape[0], block):
        x = keys[s:s + block].double()
        d = (qn - 2 * q @ x.T + x.square().sum(1)).clamp(min=0).float()  # (Q, b)
        kk = min(k, d.shape[1])
        vals, idx = torch.topk(d, kk, dim=1, largest=False)
        # topk keeps an arbitrary subset of the keys tied with the k-th distance: redo those rows
        # with a stable sort, which keeps tied keys in id order
        kth = vals[:, -1:]
        short = ((d == kth).sum(1) > (vals == kth).sum(1)).nonzero().flatten()
        if len(short):
            sv, si = torch.sort(d[short], dim=1, stable=True)
            vals[short], idx[short] = sv[:, :kk], si[:, :kk]
        best_d.append(vals.cpu().numpy())
        best_i.append(idx.cpu().numpy() + offset + s)
    return merge_topk(best_d, best_i, min(k, keys.shape[0]))


class ShardedIndex:
    """Exact search over some (default: all) shards of the keys, as SearchIndex answers:
    search(queries (Q, dim), k) -> distances (Q, k) float32, ids (Q, k) int64 (global chunk ids).
    Shards are searched in torch (`exact_search`), or, for shard_files, with faiss.IndexShards
    over the flat shard indexes; both then sort by (distance, id)."""

    def __init__(self, vectors: np.ndarray, bounds, shards=None, device=None, shard_files=None):
        self.bounds = np.asarray(bounds, dtype=np.int64)
        count = len(self.bounds) - 1
        self.shards = list(range(count)) if shards is None else sorted(int(s) for s in shards)
        bad = [s for s in self.shards if not 0 <= s < count]
        if bad:
            raise RetroError(f"shards must be in [0, {count}), got {bad}")
        self.kind, self.ntotal, self.dim = "sharded", int(self.bounds[-1]), int(vectors.shape[1])
        self.settings = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.faiss = None
        if shard_files is not None:
            import faiss

            self.vectors = vectors
            from .index import read_faiss_index

            self.flats = [read_faiss_index(shard_files[s]) for s in self.shards]
            if self.shards == list(range(count)):  # all shards: faiss merges them (ids numbered on)
                self.faiss = faiss.IndexShards(vectors.shape[1], False, True)
                for flat in self.flats:
                    self.faiss.add_shard(flat)
        else:
            self.keys = {s: torch.as_tensor(np.array(vectors[self.bounds[s]:self.bounds[s + 1]], dtype=np.float32))
                         .to(self.device) for s in self.shards}

    def _exact_distances(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Squared L2 (Q, c) float32 of queries (Q, dim) to keys ids (Q, c) (-1: inf), in float64."""
        x = np.asarray(self.vectors[np.maximum(ids, 0).reshape(-1)], dtype=np.float64).reshape(*ids.shape, -1)
        q = queries.astype(np.float64)
        d = (np.square(q).sum(1)[:, None] - 2 * np.einsum("qd,qcd->qc", q, x) + np.square(x).sum(2))
        return np.where(ids < 0, np.inf, np.maximum(d, 0)).astype(np.float32)

    def _faiss_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.faiss is not None:
            return self.faiss.search(queries, k)
        parts = [flat.search(queries, min(k, flat.ntotal)) for flat in self.flats]
        return merge_topk([d for d, _ in parts], [np.where(i >= 0, i + self.bounds[s], -1)
                                                  for s, (_, i) in zip(self.shards, parts)], k)

    def set_nprobe(self, nprobe: int) -> None:  # exact: nothing to tune
        pass

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_int("k", k, 1)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise RetroError(f"queries must be (Q, {self.dim}) vectors, got shape {tuple(queries.shape)}")
        if not self.shards:  # a rank with no shard (more ranks than shards): nothing found
            return np.full((len(queries), k), np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        if hasattr(self, "flats"):
            # faiss finds candidates in float32: ask for more than k (all, where the last one is
            # within rounding of the k-th), recompute their distances as exact_search does, and
            # cut after sorting by (distance, id)
            local = int(sum(self.bounds[s + 1] - self.bounds[s] for s in self.shards))
            wide = min(local, 2 * k + 8)
            while True:
                d, i = self._faiss_search(queries, wide)
                kth = d[:, min(k, d.shape[1]) - 1]
                if wide == local or not (d[:, -1] <= kth * (1 + 1e-4) + 1e-6).any():
                    break
                wide = local
            return merge_topk([self._exact_distances(queries, i)], [i], k)
        q = torch.tensor(queries)  # a copy: the queries may be a read-only memory map
        parts = [exact_search(self.keys[s], q, k, offset=int(self.bounds[s])) for s in self.shards]
        return merge_topk([p[0] for p in parts], [p[1] for p in parts], k)


def build_shards(vectors: np.ndarray, shards: int, out: Path | None, kind: str) -> np.ndarray:
    """Bounds of `shards` shards of vectors (n, dim); for kind "flat" writes each shard's faiss
    IndexFlatL2 to OUT/index-shards/shard-SSS.faiss (atomically). -> bounds."""
    from ..base.atomic import atomic_path

    if kind not in ("flat", "torch"):
        raise RetroError(f"--shards needs an exact index (--index flat or torch), got --index {kind!r}")
    bounds = shard_bounds(len(vectors), shards)
    if kind == "flat" and out is not None:
        import faiss

        for s in range(shards):
            index = faiss.IndexFlatL2(vectors.shape[1])
            index.add(np.asarray(vectors[bounds[s]:bounds[s + 1]], dtype=np.float32))
            with atomic_path(shard_path(out, s)) as tmp:
                faiss.write_index(index, str(tmp))
    return bounds


def shard_path(db_dir: Path, shard: int) -> Path:
    return Path(db_dir) / SHARD_DIR / f"shard-{shard:03d}.faiss"


def load_sharded_index(db_dir: Path, db, extra: dict, kind: str, shards=None, device=None,
                       use_faiss: bool | None = None) -> ShardedIndex:
    """The ShardedIndex of a sharded database (all its shards, or `shards`); faiss for kind "flat"
    unless use_faiss is False."""
    bounds = np.asarray(extra["bounds"], dtype=np.int64)
    if int(bounds[-1]) != db.num_chunks:
        raise RetroError(f"{str(db_dir)!r}: the index shards hold {int(bounds[-1])} vectors but the database "
                         f"{db.num_chunks} chunks; the database is damaged")
    files = None
    if kind == "flat" and use_faiss is not False:
        files = [shard_path(db_dir, s) for s in range(len(bounds) - 1)]
        missing = [str(f) for s, f in enumerate(files) if (shards is None or s in shards) and not f.exists()]
        if missing:
            raise RetroError(f"{str(db_dir)!r}: index shard {missing[0]!r} is missing")
    return ShardedIndex(db.embeddings, bounds, shards, device, files)


def distributed_search(index: ShardedIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Called by every rank with the same queries (Q, dim), each rank's index holding its own
    shards: each searches its shards, the (Q, k) lists are all-gathered and merged -> the
    distances (Q, k) float32 and global ids (Q, k) int64 of a search over all shards, on every rank."""
    import torch.distributed as tdist

    d, i = index.search(queries, k)
    if not tdist.is_initialized():
        return d, i
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    dt, it = torch.from_numpy(d).to(device), torch.from_numpy(i).to(device)
    world = tdist.get_world_size()
    ds, is_ = [torch.empty_like(dt) for _ in range(world)], [torch.empty_like(it) for _ in range(world)]
    tdist.all_gather(ds, dt)
    tdist.all_gather(is_, it)
    return merge_topk([x.cpu().numpy() for x in ds], [x.cpu().numpy() for x in is_], k)


def rank_shards(count: int, rank: int, world: int) -> list[int]:
    """The shards rank `rank` of `world` searches: rank, rank + world, ..."""
    return list(range(rank, count, world))
