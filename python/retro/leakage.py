"""Leakage tools (paper section 2.6 and appendix; SPEC "Evaluation").

- dedup_against: training documents whose 13-gram Jaccard similarity to any evaluation document
  is >= threshold (default 0.8). Candidates come from MinHash LSH (datasketch) with bands chosen
  to catch nearly every pair at the threshold; the exact Jaccard then decides.
- overlap_report: r(C) = longest common token substring between an evaluation chunk and its
  retrieved neighbours / chunk size; bits per byte with and without retrieval over the chunks with
  r(C) <= alpha, for a sweep of alpha, as a table and a plot.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RetroError

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


def find_duplicates(eval_docs: list, train_docs: list, threshold: float = 0.8, tokenize=word_tokens,
                    progress: bool = True) -> list[Duplicate]:
    """Training documents with 13-gram Jaccard >= threshold to some evaluation document (the
    most similar one reported)."""
    from datasketch import MinHashLSH
    from tqdm.auto import tqdm

    if not 0.0 < threshold <= 1.0:
        raise RetroError(f"--threshold must be in (0, 1], got {threshold}")
    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    eval_grams = []
    for i, doc in enumerate(tqdm(eval_docs, desc="hashing evaluation documents", disable=not progress, leave=False)):
        grams = ngrams(tokenize(doc))
        eval_grams.append(grams)
        if grams:
            lsh.insert(str(i), _minhash(grams))
    found = []
    for t, doc in enumerate(tqdm(train_docs, desc="checking training documents", disable=not progress, leave=False)):
        grams = ngrams(tokenize(doc))
        if not grams:
            continue
        best = max(((jaccard(grams, eval_grams[int(e)]), int(e)) for e in lsh.query(_minhash(grams))), default=None)
        if best is not None and best[0] >= threshold:
            found.append(Duplicate(t, best[1], best[0]))
    return found


def dedup_against(eval_corpus: str, train_corpus: str, threshold: float = 0.8, out: str | None = None,
                  text_field: str = "text", log=print) -> list[Duplicate]:
    """Lists (or, with `out`, removes) the training documents too similar to evaluation ones. `out`
    receives the kept training documents as .jsonl (field `text`), written atomically."""
    from .atomic import write_bytes
    from .retrieval.corpus import iter_documents

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


def longest_common_substring(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest run of tokens that a and b share contiguously (dynamic programming
    over one row of the table at a time)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) == 0 or len(b) == 0:
        return 0
    prev = np.zeros(len(b) + 1, dtype=np.int64)
    best = 0
    for x in a:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(b == x, prev[:-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best


def chunk_overlap(chunk: np.ndarray, neighbour_tokens: list[np.ndarray], chunk_size: int) -> float:
    """r(C): the longest common token substring of C with any of its neighbours, / chunk size."""
    return max((longest_common_substring(chunk, n) for n in neighbour_tokens), default=0) / chunk_size


ALPHAS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


def overlap_report(model, retriever, k: int = 2, max_documents: int | None = None, out: str | None = None,
                   alphas=ALPHAS, log=print) -> list[dict]:
    """Bits per byte with and without retrieval over the evaluation chunks with r(C) <= alpha."""
    from .evaluate import evaluate

    res = evaluate(model, retriever, k=k, max_documents=max_documents, collect_chunks=True)
    db, m = retriever.db, retriever.db.chunk_size
    pc = res.per_chunk
    if len(pc["chunk_tokens"]) == 0:
        raise RetroError("no complete evaluation chunk to report on")
    overlaps, nbytes = [], []
    for tokens, ids in zip(pc["chunk_tokens"], pc["neighbour_ids"]):
        values, mask = db.values(np.asarray(ids))
        overlaps.append(chunk_overlap(tokens, [v[mk] for v, mk in zip(values, mask)], m))
        nbytes.append(len(db.tokenizer.decode(tokens).encode("utf-8")))
    overlaps, nbytes = np.array(overlaps), np.array(nbytes)
    rows = []
    for alpha in alphas:
        sel = overlaps <= alpha + 1e-9
        b = int(nbytes[sel].sum())
        rows.append({"alpha": alpha, "chunks": int(sel.sum()), "fraction": float(sel.mean()), "bytes": b,
                     "bpb_on": float(pc["nll_on"][sel].sum() / math.log(2) / b) if b else None,
                     "bpb_off": float(pc["nll_off"][sel].sum() / math.log(2) / b) if b else None})
    folder = Path(out) if out else Path(".")
    _write_overlap(folder, rows, k)
    for r in rows:
        log(f"alpha {r['alpha']:<5} chunks {r['chunks']:>6} ({100 * r['fraction']:5.1f}%)  "
            f"bpb RETRO[ON] {_fmt(r['bpb_on'])}  RETRO[OFF] {_fmt(r['bpb_off'])}")
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _write_overlap(folder: Path, rows: list[dict], k: int) -> None:
    from .atomic import atomic_path, write_bytes, write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "overlap.json", {"k": k, "rows": rows})
    lines = ["| alpha | chunks | fraction | bits/byte RETRO[ON] | bits/byte RETRO[OFF] |", "|---|---|---|---|---|"]
    lines += [f"| {r['alpha']} | {r['chunks']} | {r['fraction']:.3f} | {_fmt(r['bpb_on'])} | {_fmt(r['bpb_off'])} |"
              for r in rows]
    write_bytes(folder / "overlap.md", ("\n".join(lines) + "\n").encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    a = [r["alpha"] for r in rows]
    nan = float("nan")
    ax.plot(a, [nan if r["bpb_on"] is None else r["bpb_on"] for r in rows], "o-", label="RETRO[ON]")
    ax.plot(a, [nan if r["bpb_off"] is None else r["bpb_off"] for r in rows], "s--", label="RETRO[OFF]")
    ax.set_xlabel("max chunk overlap alpha (r(C) <= alpha)")
    ax.set_ylabel("bits per byte")
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "overlap.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
