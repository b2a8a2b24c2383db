"""BM25Retriever: the Retriever of a database built with `--embedder bm25` (bm25.py). The same calls
as a dense database's: search(texts or chunk tokens, k, exclude_doc_ids=..., allowed_chunks=...) for
evaluate and generate, search_chunks for compute_neighbours; queries become terms, not embeddings.
Distances are minus the BM25 score (smaller is nearer, as with L2), inf where there is no neighbour."""
from __future__ import annotations

import numpy as np

from ..base.errors import RetroError
from .bm25 import BM25_NAME, BM25Index
from .database import ChunkDatabase, chunk_texts
from .generations import index_file
from .search import SearchBase, SearchResult, check_allowed, check_exclude, check_k


class BM25Retriever(SearchBase):
    def __init__(self, db: ChunkDatabase, index: BM25Index):
        super().__init__(db, index, BM25_NAME)

    @classmethod
    def open(cls, db: ChunkDatabase) -> "BM25Retriever":
        index = BM25Index.load(db.path / index_file(db.manifest, "bm25"), db.num_chunks)
        if index.num_chunks != db.num_chunks:
            raise RetroError(f"{str(db.path)!r}: the BM25 index covers {index.num_chunks} chunks but the database "
                             f"has {db.num_chunks}; the database is damaged")
        return cls(db, index)

    @property
    def embedder(self):
        raise RetroError(f"{str(self.db.path)!r} was built with --embedder bm25: it has no embedder and no "
                         "embeddings; search() takes texts or chunk tokens")

    def embed(self, queries):
        return self.embedder

    def search_embeddings(self, emb, k, exclude_doc_ids=None, allowed_chunks=None):
        return self.embedder

    def terms(self, queries) -> list[np.ndarray]:
        """texts (list of str) or chunk tokens (list of token lists, or an int array (Q, <=m)) ->
        each query's term ids."""
        if isinstance(queries, str):
            queries = [queries]
        if len(queries) and not isinstance(queries[0], str):
            queries = [self.db.tokenizer.decode(np.asarray(t).reshape(-1)) for t in queries]
        return self.index.term_ids(list(queries))

    def search_terms(self, terms: list[np.ndarray], k: int, exclude_doc_ids=None, allowed_chunks=None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """-> ids (Q, k) int64 (-1 = none) and distances (Q, k) float32 (minus the score, inf where none)."""
        check_k(k, self.db.num_chunks)
        exclude = allowed = None
        if allowed_chunks is not None:
            if exclude_doc_ids is not None:
                raise RetroError("allowed_chunks and exclude_doc_ids cannot be combined")
            allowed = np.zeros(self.db.num_chunks, dtype=bool)
            allowed[check_allowed(allowed_chunks, self.db.num_chunks)] = True
        if self.db.live_chunks is not None:  # removed documents' chunks are never returned
            allowed = self.db.live_chunks if allowed is None else allowed & self.db.live_chunks
        if exclude_doc_ids is not None:
            exclude = check_exclude(exclude_doc_ids, len(terms))
        ids, scores = self.index.search(terms, k, exclude, np.asarray(self.db.chunk_doc), allowed)
        return ids, np.where(ids >= 0, -scores, np.inf).astype(np.float32)

    def search_chunks(self, chunk_ids: np.ndarray, k: int, exclude_doc_ids: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(chunk_ids, dtype=np.int64)
        texts = chunk_texts(self.db.tokenizer, self.db.tokens, self.db.chunk_start[ids], self.db.chunk_len[ids])
        return self.search_terms(self.index.term_ids(texts), k, exclude_doc_ids)

    def search(self, queries, k: int, exclude_doc_ids=None, allowed_chunks=None) -> SearchResult:
        """The k best chunks of each query by BM25 with their values [chunk, continuation]."""
        return self.result(*self.search_terms(self.terms(queries), k, exclude_doc_ids, allowed_chunks))
