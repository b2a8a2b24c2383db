"""Retriever: nearest chunks of the database for queries given as text, chunk tokens or
embeddings, with same-document exclusion (docs/semantics.md: a training sequence never retrieves its own
document). Excluded or missing neighbours are masked (id -1), never replaced by another chunk.
Retriever.load returns a BM25Retriever (bm25_retriever.py) for a database built with --embedder bm25."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.errors import RetroError, damaged_file
from .database import ChunkDatabase
from .bm25 import is_bm25
from .generations import index_file, index_remedy
from .search import SearchBase, SearchResult, check_allowed, check_exclude, check_k
from .index import (INDEX_REMEDY, IndexSettings, SearchIndex, TorchExactIndex, check_max_k, faiss_available,
                    read_faiss_index, warn_without_faiss)


class Retriever(SearchBase):
    """Search by embedded keys (BERT or static), through the database's faiss or torch index."""

    @classmethod
    def load(cls, path: str | Path, embedder: str | None = None, device=None, index: str | None = None) -> "Retriever":
        """Loads DIR. `embedder` (optional) must be the one the database was built with;
        `index="torch"` searches exactly in torch instead of with the faiss index, as where faiss is
        not installed (with a warning then)."""
        db = ChunkDatabase(path)
        built_with = db.manifest["embedder"]["name"]
        if embedder is not None and embedder != built_with:
            raise RetroError(f"{str(path)!r} was built with the embedder {built_with!r}; queries embedded with "
                             f"{embedder!r} would not match its keys")
        if is_bm25(built_with):
            from .bm25_retriever import BM25Retriever

            try:
                return BM25Retriever.open(db)
            except RetroError:
                if db.is_current():
                    raise
                return cls.load(path, embedder, device, index)  # compact deleted its files meanwhile: the new one
        settings = IndexSettings(**db.manifest["index"])
        use_faiss = index != "torch" and settings.kind != "torch"  # the database's own faiss index(es)
        if use_faiss and not faiss_available():
            warn_without_faiss(path, settings.kind)
            use_faiss = False
        if settings.extra.get("shards"):
            from .sharded import load_sharded_index

            search_index = load_sharded_index(Path(path), db, settings.extra, settings.kind, device=device,
                                              use_faiss=use_faiss)
            search_index.settings = settings
        elif not use_faiss:
            settings = IndexSettings(kind="torch", recall=1.0)
            search_index = SearchIndex(settings, vectors=db.embeddings, device=device)
        else:
            faiss_path = Path(path) / index_file(db.manifest, "index.faiss")
            if not faiss_path.exists() and not db.is_current():  # compact switched generations, deleted this one
                return cls.load(path, embedder, device, index)
            search_index = SearchIndex(settings, read_faiss_index(faiss_path, index_remedy(path) if db.generation
                                                                  else INDEX_REMEDY))
            if search_index.ntotal != db.num_chunks:
                raise damaged_file(faiss_path, f"it holds {search_index.ntotal} vectors, the database "
                                   f"{db.num_chunks} chunks", index_remedy(path) if db.generation else INDEX_REMEDY)
        return cls(db, search_index, built_with, device)

    @property
    def embedder(self):
        if self._embedder is None:
            from .embedder import make_embedder

            self._embedder = make_embedder(self.embedder_name, device=self.device)
            want = self.db.manifest["embedder"]["dim"]
            if self._embedder.dim != want:
                raise RetroError(f"the embedder {self.embedder_name!r} gives {self._embedder.dim}-dim vectors; "
                                 f"the database's keys have {want}")
        return self._embedder

    def embed(self, queries) -> np.ndarray:
        """texts (list of str) or chunk tokens (list of token lists, or an int array (Q, <=m))."""
        if isinstance(queries, str):
            queries = [queries]
        if len(queries) and not isinstance(queries[0], str):
            queries = [self.db.tokenizer.decode(np.asarray(t).reshape(-1)) for t in queries]
        return self.embedder.embed(list(queries))

    def _subset_index(self, allowed: np.ndarray) -> tuple[TorchExactIndex, np.ndarray]:
        """An exact index over the chunks `allowed` (kept for the last subset asked for), removed
        documents' chunks left out."""
        allowed = check_allowed(allowed, self.db.num_chunks)
        if self.db.live_chunks is not None:
            allowed = allowed[self.db.live_chunks[allowed]]
        key = (len(allowed), hash(allowed.tobytes()))
        if getattr(self, "_subset", (None,))[0] != key:
            self._subset = (key, TorchExactIndex(self.db.embeddings[allowed], device=self.device), allowed)
        return self._subset[1], self._subset[2]

    def search_embeddings(self, emb: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None,
                          allowed_chunks: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> ids (Q, k) int64 and distances (Q, k). With exclude_doc_ids (Q,), neighbours from
        that document are dropped: the search oversamples, then masks what is still missing.
        With allowed_chunks (chunk ids), only those chunks are searched, exactly (a part of the
        database, e.g. to measure how the gain grows with the database). Chunks of removed documents
        (remove-documents) are never returned."""
        check_k(k, self.db.num_chunks)
        emb = np.asarray(emb, dtype=np.float32)
        if allowed_chunks is not None:
            if exclude_doc_ids is not None:
                raise RetroError("allowed_chunks and exclude_doc_ids cannot be combined")
            sub, allowed = self._subset_index(allowed_chunks)
            d, i = sub.search(emb, min(k, len(allowed)))
            ids = np.full((len(emb), k), -1, dtype=np.int64)
            dist = np.full((len(emb), k), np.inf, dtype=np.float32)
            ids[:, :i.shape[1]] = np.where(i >= 0, allowed[np.maximum(i, 0)], -1)
            dist[:, :i.shape[1]] = np.where(i >= 0, d, np.inf)
            return ids, dist
        live = self.db.live_chunks
        if exclude_doc_ids is None and live is None:
            d, i = self.index.search(emb, k)
            return i.astype(np.int64), np.where(i >= 0, d, np.inf).astype(np.float32)
        exclude = None if exclude_doc_ids is None else check_exclude(exclude_doc_ids, len(emb))
        max_k = getattr(self.index, "max_k", None)  # faiss on GPUs: no search wider than that
        check_max_k(k, max_k)
        cap = min(self.db.num_chunks, max_k or self.db.num_chunks)
        ids = np.full((len(emb), k), -1, dtype=np.int64)
        dist = np.full((len(emb), k), np.inf, dtype=np.float32)
        todo = np.arange(len(emb))
        wide = min(cap, 2 * k + 8)  # at most cap: what is still missing then is masked
        while len(todo):  # only the queries still short of k go round again, each time 4x wider
            d, i = self.index.search(emb[todo], wide)
            keep = i >= 0
            if exclude is not None:
                keep &= self.db.chunk_doc[np.maximum(i, 0)] != exclude[todo, None]
            if live is not None:
                keep &= live[np.maximum(i, 0)]
            done = (keep.sum(1) >= k) | (wide == cap)
            first = np.argsort(~keep[done], axis=1, kind="stable")[:, :k]  # the first k kept, in rank order
            kept = np.take_along_axis(keep[done], first, 1)
            ids[todo[done]] = np.where(kept, np.take_along_axis(i[done], first, 1), -1)
            dist[todo[done]] = np.where(kept, np.take_along_axis(d[done], first, 1), np.inf)
            todo = todo[~done]
            wide = min(cap, wide * 4)
        return ids, dist

    def search_chunks(self, chunk_ids: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The neighbours of the database's own chunks `chunk_ids` (Q,): ids (Q, k), distances (Q, k)
        (compute_neighbours' queries). Their keys come from the index where it holds them (the same
        values, without mapping embeddings.npy as well: SearchIndex.stored_keys)."""
        held = getattr(self.index, "stored_keys", lambda: None)()
        keys = held if held is not None and len(held) == self.db.num_chunks else self.db.embeddings
        return self.search_embeddings(keys[np.asarray(chunk_ids)], k, exclude_doc_ids)

    def search(self, queries, k: int, exclude_doc_ids=None, allowed_chunks=None) -> SearchResult:
        """The k nearest chunks of each query with their values [chunk, continuation]."""
        return self.result(*self.search_embeddings(self.embed(queries), k, exclude_doc_ids, allowed_chunks))


def database_fraction(db: ChunkDatabase, fraction: float, seed: int = 0) -> np.ndarray:
    """The chunk ids of a seeded random `fraction` of the training documents (whole documents;
    the parts for smaller fractions are contained in those for larger ones)."""
    if not 0.0 < fraction <= 1.0:
        raise RetroError(f"the database fraction must be in (0, 1], got {fraction}")
    train = db.documents("train")
    keep = np.random.default_rng(seed).permutation(train)[: max(1, int(round(fraction * len(train))))]
    return np.flatnonzero(np.isin(db.chunk_doc, keep))
