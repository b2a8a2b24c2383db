"""The reference BM25 of bm25.py in plain Python (no numpy, no bm25s), to check it against: the
formula written out term by term, in float64, for hand-checkable inputs."""
from __future__ import annotations

import math


def naive_scores(chunks: list[list[str]], query: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """score(query, d) for every chunk d (each a list of terms, repeats kept): the sum over the
    query's terms (each occurrence) of idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)); a term no chunk has adds nothing."""
    n = len(chunks)
    avgdl = sum(len(c) for c in chunks) / n
    df = {}
    for c in chunks:
        for t in set(c):
            df[t] = df.get(t, 0) + 1
    out = []
    for c in chunks:
        score = 0.0
        for t in query:
            tf = c.count(t)
            if tf == 0:
                continue
            idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
            score += idf * tf / (tf + k1 * (1 - b + b * len(c) / avgdl))
        out.append(score)
    return out


def naive_top_k(scores: list[float], k: int, excluded: set[int] = frozenset()) -> list[int]:
    """The k best chunk ids by score (ties: the smaller id), leaving out `excluded` and chunks that
    score 0; -1 fills the places of missing neighbours."""
    ranked = sorted((i for i, s in enumerate(scores) if s > 0 and i not in excluded), key=lambda i: (-scores[i], i))
    return (ranked + [-1] * k)[:k]
