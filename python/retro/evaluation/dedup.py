"""The 13-gram near-duplicate filter, the paper's guard against leakage (docs/semantics.md,
"Evaluation"): dedup_against lists or removes the training documents whose 13-gram Jaccard
similarity to any evaluation document is >= threshold (default 0.8). Candidates come from MinHash
LSH (datasketch) with bands chosen to catch nearly every pair at the threshold; the exact Jaccard
then decides. The overlap report (bits per byte against chunk overlap) is evaluate_overlap.py.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..base.checks import check_float

NGRAM = 13
NUM_PERM = 128
# 32 bands of 4 rows: P(candidate | J) = 1 - (1 - J^4)^32 is 1 - 5e-8 at J = 0.8 and 0.23 at J = 0.3
BANDS, ROWS = 32, 4
_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def ngrams(tokens, n: int = NGRAM) -> set[tuple]:
    """The set of n-grams of a token list (a shorter document is one n-gram of all its tokens)."""
    tokens = list(tokens)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def candidate_probability(j: float, bands: int = BANDS, rows: int = ROWS) -> float:
    """Probability that LSH proposes a pair of Jaccard similarity j."""
    return 1.0 - (1.0 - j ** rows) ** bands


def _minhash(grams: set):
    from datasketch import MinHash

    mh = MinHash(num_perm=NUM_PERM, seed=1)
    mh.update_batch([" ".join(map(str, g)).encode("utf-8") for g in grams])
    return mh


@dataclass
class Duplicate:
    train_index: int
    eval_index: int
    jaccard: float


def similar_pairs(eval_docs: list, train_docs: list, threshold: float = 0.8, tokenize=word_tokens,
                  progress: bool = True) -> list[Duplicate]:
    """Every (training document, evaluation document) pair with 13-gram Jaccard >= threshold:
    MinHash LSH proposes candidates, the exact Jaccard decides."""
    from datasketch import MinHashLSH
    from retro.base.progress import progress_bar

    check_float("--threshold", threshold, 0, 1, low_open=True)
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    eval_grams = []
    for i, doc in enumerate(progress_bar(eval_docs, desc="hashing evaluation documents", disable=not progress,
                                         leave=False)):
        grams = ngrams(tokenize(doc))
        eval_grams.append(grams)
        if grams:
            lsh.insert(str(i), _minhash(grams))
    found = []
    for t, doc in enumerate(progress_bar(train_docs, desc="checking training documents", disable=not progress,
                                         leave=False)):
        grams = ngrams(tokenize(doc))
        if not grams:
            continue
        for e in lsh.query(_minhash(grams)):
            j = jaccard(grams, eval_grams[int(e)])
            if j >= threshold:
                found.append(Duplicate(t, int(e), j))
    return found


def find_duplicates(eval_docs: list, train_docs: list, threshold: float = 0.8, tokenize=word_tokens,
                    progress: bool = True) -> list[Duplicate]:
    """Training documents with 13-gram Jaccard >= threshold to some evaluation document (the
    most similar one reported)."""
    best: dict[int, Duplicate] = {}
    for d in similar_pairs(eval_docs, train_docs, threshold, tokenize, progress):
        if d.train_index not in best or (d.jaccard, -d.eval_index) > (best[d.train_index].jaccard,
                                                                       -best[d.train_index].eval_index):
            best[d.train_index] = d
    return [best[t] for t in sorted(best)]


def duplicated_documents(eval_docs: list, train_docs: list, threshold: float = 0.8, progress: bool = True) -> set[int]:
    """Indices of the evaluation documents that have a near-duplicate (13-gram Jaccard >= threshold)
    among the training documents: the paper's filter for evaluating without leakage."""
    return {d.eval_index for d in similar_pairs(eval_docs, train_docs, threshold, progress=progress)}


def dedup_against(eval_corpus: str, train_corpus: str, threshold: float = 0.8, out: str | None = None,
                  text_field: str = "text", log=print) -> list[Duplicate]:
    """Lists (or, with `out`, removes) the training documents too similar to evaluation ones. `out`
    receives the kept training documents as .jsonl (field `text`), written atomically."""
    from ..base.atomic import write_bytes
    from ..retrieval.corpus import iter_documents

    check_float("--threshold", threshold, 0, 1, low_open=True)
    eval_docs = list(iter_documents(eval_corpus, text_field))
    train_docs = list(iter_documents(train_corpus, text_field))
    dups = find_duplicates(eval_docs, train_docs, threshold)
    for d in dups:
        preview = train_docs[d.train_index][:60].replace("\n", " ")
        log(f"train document {d.train_index} ~ eval document {d.eval_index}: Jaccard {d.jaccard:.3f}  {preview!r}")
    log(f"[dedup] {len(dups)} of {len(train_docs)} training documents have 13-gram Jaccard >= {threshold} "
        f"with one of {len(eval_docs)} evaluation documents")
    if out:
        drop = {d.train_index for d in dups}
        kept = "".join(json.dumps({"text": t}) + "\n" for i, t in enumerate(train_docs) if i not in drop)
        write_bytes(out, kept.encode("utf-8"))
        log(f"[dedup] kept {len(train_docs) - len(drop)} documents -> {out}")
    return dups
