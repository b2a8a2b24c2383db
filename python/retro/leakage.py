"""Leakage tools (paper section 2.6 and appendix; docs/semantics.md, "Evaluation").

- dedup_against: training documents whose 13-gram Jaccard similarity to any evaluation document
  is >= threshold (default 0.8). Candidates come from MinHash LSH (datasketch) with bands chosen
  to catch nearly every pair at the threshold; the exact Jaccard then decides.
- overlap_report: r(C) = longest common token substring between the scored tokens of an
  evaluation chunk and the neighbours they attended / chunk size; bits per byte with and without
  retrieval over the tokens with r(C) <= alpha, for a sweep of alpha, as a table and a plot.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checks import check_float

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
    from tqdm.auto import tqdm

    check_float("--threshold", threshold, 0, 1, low_open=True)
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
    from .atomic import write_bytes
    from .retrieval.corpus import iter_documents

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


def group_overlaps(es) -> np.ndarray:
    """r for every group of scored tokens of an evaluation set (evaluate.EvalSet): the longest
    run of the group's tokens found in the neighbours they attended (those retrieved for the
    previous chunk), / chunk size; 0 for tokens that attended no neighbour."""
    out = np.zeros(len(es.group_doc))
    if es.neighbours is None:
        return out
    for g in range(len(out)):
        row = es.group_neighbour_row(g)
        if row >= 0:
            nb = [v[mk] for v, mk in zip(es.neighbours[row], es.neighbour_mask[row])]
            out[g] = chunk_overlap(es.group_targets[g], nb, es.chunk_size)
    return out


def overlap_rows(es, overlaps: np.ndarray, nlls: dict, alphas=ALPHAS, select: np.ndarray | None = None) -> list[dict]:
    """For each alpha: the scored tokens whose overlap r <= alpha (their share of the bytes) and
    the bits per byte of each model in `nlls` (name -> NLL per group) over them. The alpha = 1 row
    covers every scored token: its figures are evaluate's."""
    from .evaluate import bits_per_byte

    keep = np.ones(len(overlaps), dtype=bool) if select is None else np.asarray(select, dtype=bool)
    total = int(es.group_bytes[keep].sum())
    rows = []
    for alpha in alphas:
        sel = keep & (overlaps <= alpha + 1e-9)
        b = int(es.group_bytes[sel].sum())
        row = {"alpha": alpha, "tokens": int(es.group_tokens[sel].sum()), "bytes": b,
               "fraction": b / total if total else 0.0}
        for name, nll in nlls.items():
            row[name] = bits_per_byte(nll[sel], es.group_bytes[sel]) if b else None
        rows.append(row)
    return rows


def format_overlap(rows: list[dict], names) -> list[str]:
    """The overlap table as markdown lines."""
    names = list(names)
    lines = ["| alpha | tokens | share of bytes | " + " | ".join(f"bits/byte {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    lines += [f"| {r['alpha']} | {r['tokens']} | {r['fraction']:.3f} | " + " | ".join(_fmt(r[n]) for n in names) + " |"
              for r in rows]
    return lines


def overlap_report(model, retriever, k: int = 2, max_documents: int | None = None, out: str | None = None,
                   alphas=ALPHAS, log=print, progress: bool = True) -> list[dict]:
    """Bits per byte with and without retrieval over the scored tokens with overlap r <= alpha."""
    from .evaluate import prepare, score

    es = prepare(retriever, k, max_documents=max_documents, seq_len=model.cfg.max_seq_len)
    nlls = {"RETRO[ON]": score(model, es, True, progress=progress), "RETRO[OFF]": score(model, es, False, progress=progress)}
    rows = overlap_rows(es, group_overlaps(es), nlls, alphas)
    _write_overlap(Path(out) if out else Path("."), rows, list(nlls), k)
    for line in format_overlap(rows, nlls):
        log(line)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _write_overlap(folder: Path, rows: list[dict], names: list[str], k: int) -> None:
    from .atomic import atomic_path, write_bytes, write_json

    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "overlap.json", {"k": k, "rows": rows})
    write_bytes(folder / "overlap.md", ("\n".join(format_overlap(rows, names)) + "\n").encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    a = [r["alpha"] for r in rows]
    for name, style in zip(names, ("o-", "s--", "^:", "d-.")):
        ax.plot(a, [float("nan") if r[name] is None else r[name] for r in rows], style, label=name)
    ax.set_xlabel("max chunk overlap alpha (r(C) <= alpha)")
    ax.set_ylabel("bits per byte")
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "overlap.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
