"""What both retrievers share (the dense one, retriever.py, and BM25's, bm25_retriever.py): a search's
result, the checks of k, exclude_doc_ids and allowed_chunks, and the base class holding the database
and its index. Retriever.load opens either kind."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base.errors import RetroError
from .database import ChunkDatabase


@dataclass
class SearchResult:
    ids: np.ndarray        # (Q, k) int64, -1 = no neighbour
    distances: np.ndarray  # (Q, k) float32 squared L2 (BM25: minus the score), inf where no neighbour
    tokens: np.ndarray     # (Q, k, 2 * chunk_size) int64, [chunk, continuation], pad where masked
    mask: np.ndarray       # (Q, k, 2 * chunk_size) bool, True = real token


class SearchBase:
    """A database and its index; search() returns a SearchResult (the neighbours' ids, distances and
    values [chunk, continuation])."""

    def __init__(self, db: ChunkDatabase, index, embedder_name: str | None = None, device=None):
        self.db, self.index, self.device = db, index, device
        self.embedder_name = embedder_name or db.manifest["embedder"]["name"]
        self._embedder = None

    def result(self, ids: np.ndarray, distances: np.ndarray) -> SearchResult:
        """ids (Q, k) and distances (Q, k) -> the SearchResult with the chunks' values."""
        tokens, mask = self.db.values(ids)
        return SearchResult(ids, distances, tokens, mask)


def check_k(k, num_chunks: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RetroError(f"k must be a positive int, got {k!r}")
    if k > num_chunks:
        raise RetroError(f"k={k} is larger than the database ({num_chunks} chunks)")


def check_exclude(exclude_doc_ids, n_queries: int) -> np.ndarray:
    """exclude_doc_ids as a (Q,) array, one document id per query."""
    exclude = np.asarray(exclude_doc_ids).reshape(-1)
    if len(exclude) != n_queries:
        raise RetroError(f"exclude_doc_ids has {len(exclude)} entries for {n_queries} queries")
    return exclude


def check_allowed(allowed_chunks, num_chunks: int) -> np.ndarray:
    """allowed_chunks (chunk ids) -> their sorted unique ids; RetroError unless all in [0, num_chunks)."""
    allowed = np.unique(np.asarray(allowed_chunks, dtype=np.int64))
    if len(allowed) == 0 or allowed[0] < 0 or allowed[-1] >= num_chunks:
        raise RetroError(f"allowed_chunks must be chunk ids in [0, {num_chunks}), got {len(allowed)} ids "
                         f"in [{allowed.min(initial=0)}, {allowed.max(initial=0)}]")
    return allowed
