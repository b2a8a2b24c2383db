"""BM25 over the database's chunks: the sparse alternative to the frozen BERT's keys (`--embedder bm25`).

Doostmohammadi et al. 2023 (arXiv 2305.16243) found BM25 neighbours gave RETRO lower perplexity than
dense ones; benchmarks/retriever_bpb.py measures it here. Select it where the embedder is chosen
(`retro build-db --embedder bm25`, `retro demo --embedder bm25`): the name goes into the manifest and
the database's identity like any embedder's, and Retriever.load returns a BM25Retriever for it.

Terms: a chunk's text (its tokens decoded) split by bm25s's regex word tokenizer (runs of two or more
word characters, so `hidden_states` and `LlamaAttention` stay whole), lowercased, no stop words, no
stemming (TERMS_DESCRIPTION). A query's terms are found the same way; terms outside the vocabulary are
dropped, and each occurrence counts (a term twice in the query adds its score twice, as in bm25s and
Lucene). Why words and not the database's own token ids (benchmarks/results/retrievers-amd-*.md): on
code both find neighbours that hold as much of a held-out chunk's next chunk (mean r(C) 0.607 with
words, 0.603 with token ids), but token ids answer 100x fewer queries per second (frequent pieces such
as `(` or `self` have posting lists as long as the database); stop words and stemming change nothing.

Score of chunk d for a query q (bm25s's "lucene" variant, k1 = 1.5, b = 0.75):
    score(q, d) = sum over the terms t of q of idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
with N the number of chunks, df(t) the chunks containing t, tf(t, d) t's count in d, |d| d's number of
terms and avgdl their mean over the chunks. bm25_naive.py computes the same in plain Python.

The index is bm25s's: the score of every (term, chunk) pair it occurs in, float32, term-major (CSC:
indptr (V+1,) int64, indices (P,) int32 chunk ids, data (P,) float32), and the vocabulary (V words,
sorted), in the folder bm25/ of the database. search() scores every chunk (an exact search: no recall
below 1): for a block of queries, the postings of their terms are summed into a dense (queries, chunks)
array, so a query costs O(chunks + its postings). Neighbours are the top k by score, ties broken by the
smaller chunk id; a chunk that shares no term with the query (score 0) is never a neighbour (id -1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base.errors import RetroError

BM25_NAME = "bm25"
K1, B, METHOD = 1.5, 0.75, "lucene"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
TERMS_DESCRIPTION = ("words of the decoded chunk text: bm25s's regex (?u)\\b\\w\\w+\\b, lowercased, no stop words, "
                     "no stemming")
FILES = ("data.npy", "indices.npy", "indptr.npy", "vocab.txt")
SCORE_BLOCK = 1 << 24  # (queries x chunks) scores summed per block of queries


def is_bm25(name) -> bool:
    return name == BM25_NAME


def words(texts: list[str]) -> list[list[str]]:
    """Each text's terms (TERMS_DESCRIPTION), in order, repeats kept."""
    import bm25s

    if isinstance(texts, str):
        raise RetroError(f"words() takes a list of texts, got one str ({texts[:40]!r})")
    return bm25s.tokenize(list(texts), lower=True, token_pattern=TOKEN_PATTERN, stopwords=None, return_ids=False,
                          show_progress=False)


def describe() -> dict:
    import bm25s

    return {"name": BM25_NAME, "dim": 0, "bm25": {"k1": K1, "b": B, "method": METHOD, "terms": TERMS_DESCRIPTION,
                                                  "bm25s": bm25s.__version__}}


class BM25Index:
    """The BM25 scores of a database's chunks: build() from each chunk's term ids, save()/load() a
    folder, term_ids() of query texts, search() the top k of queries given as term ids."""

    kind = "bm25"

    def __init__(self, data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, vocab: list[str], num_chunks: int):
        self.data = np.asarray(data, dtype=np.float32)        # (P,) score of each posting
        self.indices = np.asarray(indices, dtype=np.int32)    # (P,) its chunk
        self.indptr = np.asarray(indptr, dtype=np.int64)      # (V+1,) term t's postings: indptr[t]:indptr[t+1]
        self.vocab = list(vocab)                              # (V,) sorted words
        self.num_chunks = self.ntotal = int(num_chunks)
        if len(self.indptr) != len(self.vocab) + 1 or len(self.data) != len(self.indices) or \
                (len(self.indptr) and self.indptr[-1] != len(self.data)):
            raise RetroError(f"a BM25 index of {len(self.vocab)} terms needs {len(self.vocab) + 1} term pointers "
                             f"and as many scores as chunk ids; got {len(self.indptr)} pointers, {len(self.data)} "
                             f"scores, {len(self.indices)} chunk ids: the index is damaged")
        self._ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, term_ids: list, vocab: list[str], k1: float = K1, b: float = B, method: str = METHOD) -> "BM25Index":
        """term_ids: for each chunk, its terms as ids into vocab (a list or int array each, repeats
        kept); bm25s computes the scores."""
        import bm25s

        corpus = [np.asarray(t, dtype=np.int64).tolist() for t in term_ids]
        if not corpus:
            raise RetroError("a BM25 index needs at least one chunk")
        used = max((max(t) for t in corpus if t), default=-1)
        if used >= len(vocab):
            raise RetroError(f"term id {used} is outside the vocabulary of {len(vocab)} terms")
        n = len(corpus)
        if not vocab:  # no chunk has a term: nothing ever scores
            return cls(np.zeros(0), np.zeros(0), np.zeros(1), [], n)
        retriever = bm25s.BM25(k1=k1, b=b, method=method)
        retriever.index((corpus, {w: i for i, w in enumerate(vocab)}), create_empty_token=False, show_progress=False)
        s = retriever.scores
        return cls(s["data"], s["indices"], s["indptr"], vocab, n)

    def save(self, folder: str | Path) -> None:
        """The four FILES into folder (callers write the folder atomically: atomic.write_folder)."""
        folder = Path(folder)
        for name, arr in (("data", self.data), ("indices", self.indices), ("indptr", self.indptr)):
            np.save(folder / f"{name}.npy", arr)
        (folder / "vocab.txt").write_bytes("\n".join(self.vocab).encode("utf-8"))

    @classmethod
    def load(cls, folder: str | Path, num_chunks: int) -> "BM25Index":
        folder = Path(folder)
        missing = [f for f in FILES if not (folder / f).exists()]
        if missing:
            raise RetroError(f"{str(folder)!r}: the BM25 index is incomplete ({', '.join(missing)} missing)")
        text = (folder / "vocab.txt").read_bytes().decode("utf-8")
        index = cls(np.load(folder / "data.npy"), np.load(folder / "indices.npy"), np.load(folder / "indptr.npy"),
                    text.split("\n") if text else [], num_chunks)
        if len(index.indices) and int(index.indices.max()) >= num_chunks:
            raise RetroError(f"{str(folder)!r}: the BM25 index names chunk {int(index.indices.max())} but the "
                             f"database has {num_chunks} chunks; the database is damaged")
        return index

    def term_ids(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's terms as vocabulary ids (int64), unknown words dropped, repeats kept."""
        get = self._ids.get
        return [np.fromiter((i for i in (get(w) for w in ws) if i is not None), dtype=np.int64)
                for ws in words(texts)]

    def scores(self, queries: list[np.ndarray]) -> np.ndarray:
        """queries: term ids of each -> (Q, C) float64 BM25 scores against every chunk."""
        n = self.num_chunks
        q_len = np.array([len(q) for q in queries], dtype=np.int64)
        terms = np.concatenate([np.asarray(q, dtype=np.int64) for q in queries]) if len(queries) else \
            np.zeros(0, np.int64)
        if len(terms) and (terms.min() < 0 or terms.max() >= len(self.vocab)):
            raise RetroError(f"query term ids must be in [0, {len(self.vocab)}), got [{terms.min()}, {terms.max()}]")
        starts, ends = self.indptr[terms], self.indptr[terms + 1]
        counts = ends - starts                                    # postings of each query term
        rows = np.repeat(np.repeat(np.arange(len(queries), dtype=np.int64), q_len), counts)
        # the postings of every query term, concatenated: starts[j] + 0, 1, ..., counts[j] - 1
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        post = offsets + np.arange(int(counts.sum()), dtype=np.int64)
        flat = rows * n + self.indices[post]
        summed = np.bincount(flat, weights=self.data[post], minlength=len(queries) * n)
        return summed.astype(np.float64, copy=False).reshape(len(queries), n)  # (bincount of nothing: int64)

    def search(self, queries: list[np.ndarray], k: int, exclude_doc_ids: np.ndarray | None = None,
               chunk_doc: np.ndarray | None = None, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks of each query (term ids): ids (Q, k) int64 (-1 = none) and scores (Q, k)
        float32 (0 where none). exclude_doc_ids (Q,) with chunk_doc (C,): chunks of the query's own
        document are left out; allowed (C,) bool: only those chunks are searched."""
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        best = np.zeros((len(queries), k), dtype=np.float32)
        step = max(1, SCORE_BLOCK // max(1, self.num_chunks))
        for s in range(0, len(queries), step):
            sc = self.scores(queries[s:s + step])
            sc[sc <= 0] = -np.inf  # no shared term: not a neighbour
            if exclude_doc_ids is not None:
                sc[chunk_doc[None, :] == np.asarray(exclude_doc_ids[s:s + step])[:, None]] = -np.inf
            if allowed is not None:
                sc[:, ~allowed] = -np.inf
            i, v = top_k(sc, k)
            ids[s:s + len(i)], best[s:s + len(i)] = i, np.where(i >= 0, v, 0)
        return ids, best


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, C) scores (-inf = not a candidate) -> ids (Q, k) int64 and their scores, by score
    descending, ties by the smaller id; -1 (score -inf) where a row has fewer than k candidates."""
    q, n = scores.shape
    ids = np.full((q, k), -1, dtype=np.int64)
    vals = np.full((q, k), -np.inf)
    if q == 0 or n == 0:
        return ids, vals
    kk = min(k, n)
    kth = np.take_along_axis(scores, np.argpartition(-scores, kk - 1, axis=1)[:, kk - 1:kk], 1)  # (Q, 1)
    rows, cols = np.nonzero((scores >= kth) & (scores > -np.inf))  # the k best and every tie with the k-th
    s = scores[rows, cols]
    order = np.lexsort((cols, -s, rows))
    rows, cols, s = rows[order], cols[order], s[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within its row
    keep = rank < kk
    ids[rows[keep], rank[keep]] = cols[keep]
    vals[rows[keep], rank[keep]] = s[keep]
    return ids, vals
